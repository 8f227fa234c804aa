"""Transfer baselines (algo=baseline, rfs), init_from= (Meta-Baseline) and train.max_minutes:
the minibatch sampler, the support classifiers against per-episode references, the CLI on the
glyphs, and real learning on Omniglot."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import eval_result
from helpers import TINY, ok, one_sentence
from test_sampler import id_store

from fewshot_cli.algorithms.baseline import (
    Baseline,
    chen_scale,
    init_head,
    logistic_regression,
    minibatches,
)
from fewshot_cli.algorithms.protonet import ProtoNet
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.data.batches import BatchSampler
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.errors import FewshotError

# ---------------------------------------------------------------- the minibatch sampler


def test_batches_hold_real_images_of_their_labelled_class():
    sampler = BatchSampler(id_store([3, 5, 2, 4]), batch_size=200, seed=1)
    batch = sampler.sample()
    assert batch.images.shape == (200, 1, 4, 4) and batch.labels.shape == (200,)
    assert batch.classes == 4
    raw = (batch.images[:, 0, 0, :2] * 255).round().long()
    assert torch.equal(raw[:, 0], batch.labels)  # each image is of the class it is labelled
    counts = torch.tensor([3, 5, 2, 4])
    assert bool((raw[:, 1] < counts[batch.labels]).all())  # padding slots are never drawn
    # every image is equally likely: classes come as often as they have images
    share = torch.bincount(batch.labels, minlength=4).float() / 200
    assert torch.allclose(share, counts / counts.sum(), atol=0.1)


def test_batches_resume_exactly_from_the_generator_state():
    store = id_store([6, 6, 6])
    straight = BatchSampler(store, 8, seed=3)
    first = [straight.sample() for _ in range(5)]
    resumed = BatchSampler(store, 8, seed=3)
    for _ in range(2):
        resumed.sample()
    state = resumed.generator.get_state()  # what a checkpoint keeps
    again = BatchSampler(store, 8, seed=99)
    again.generator.set_state(state)
    for expected in first[2:]:
        got = again.sample()
        assert torch.equal(got.images, expected.images) and torch.equal(got.labels,
                                                                        expected.labels)


def test_a_bad_batch_size_is_one_sentence():
    with pytest.raises(FewshotError, match=r"train.batch_size=0 must be"):
        BatchSampler(id_store([3, 3]), 0)


# ---------------------------------------------------------------- Chen et al.'s fine-tuning


@pytest.fixture
def one_torch_thread():
    """The references' tiny ops on one thread (see baseline.one_thread: on a busy machine each
    parallel region of a step waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chen_reference(kind: str, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor,
                   ways: int, picks: list[torch.Tensor], init: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
    """One episode as CloserLookFewShot's methods/baselinefinetune.py does it, in float64: an
    nn.Linear (Baseline) or distLinear (Baseline++: weight-normed rows, features divided by
    their norm + 1e-5, times the scale) trained by SGD(lr 0.01, momentum 0.9, dampening 0.9,
    weight decay 0.001) on the given minibatches; returns the query scores."""
    d = support.shape[-1]
    weight, other = (t.double() for t in init)
    if kind == "linear":
        head = torch.nn.Linear(d, ways).double()
        head.weight.data.copy_(weight)
        head.bias.data.copy_(other)
        score = head
    else:
        linear = torch.nn.utils.parametrizations.weight_norm(
            torch.nn.Linear(d, ways, bias=False).double(), dim=0)
        linear.parametrizations.weight.original0.data.copy_(other.unsqueeze(1))  # the norms
        linear.parametrizations.weight.original1.data.copy_(weight)  # the directions
        head = linear
        scale = chen_scale(ways)
        score = lambda x: scale * linear(x / (x.norm(dim=1, keepdim=True) + 1e-5))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, dampening=0.9,
                                weight_decay=0.001)
    for idx in picks:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(score(support[idx].double()), labels[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return score(query.double())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("shots", [1, 3])
def test_finetuning_matches_a_per_episode_float64_reference(kind, shots, one_torch_thread):
    torch.manual_seed(0)
    b, ways, d = 3, 5, 16
    support = torch.randn(b, ways * shots, d) * 3 + 1
    query = torch.randn(b, ways * 4, d) * 3 + 1
    labels = torch.arange(ways).repeat_interleave(shots).expand(b, -1)
    algo = Baseline(Conv4(hidden=8), ways, classifier=kind)
    ours = algo.finetune(support, labels, query, ways)
    g = torch.Generator().manual_seed(algo.finetune_seed)  # the same draws, in the same order
    init = init_head(kind, d, ways, g)
    picks = minibatches(ways * shots, 4, None, g)
    assert len(picks) == 100 * math.ceil(ways * shots / 4)  # Chen et al.'s 100 epochs
    for e in range(b):
        expected = chen_reference(kind, support[e], labels[e], query[e], ways, picks, init)
        assert torch.allclose(ours[e].double(), expected, atol=1e-4, rtol=1e-4), kind
    assert (ours.argmax(-1) == torch.tensor(0)).float().mean() < 0.9  # not a constant answer


def test_finetuning_does_not_depend_on_how_episodes_are_batched():
    torch.manual_seed(1)
    support, query = torch.randn(4, 5, 8), torch.randn(4, 20, 8)
    labels = torch.arange(5).expand(4, -1)
    algo = Baseline(Conv4(hidden=8), 5, classifier="cosine", finetune_steps=30)
    together = algo.finetune(support, labels, query, 5)
    alone = torch.cat([algo.finetune(support[i:i + 1], labels[i:i + 1], query[i:i + 1], 5)
                       for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6)


# ---------------------------------------------------------------- RFS: logistic regression


def test_logistic_regression_matches_scikit_learn_on_the_same_features():
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(2)
    b, ways, shots, d = 3, 5, 2, 32
    support = torch.randn(b, ways * shots, d) * 5 + 2  # far from unit norm
    query = torch.randn(b, ways * 6, d) * 5 + 2
    labels = torch.arange(ways).repeat_interleave(shots).expand(b, -1)
    ours = logistic_regression(support, labels, query, ways)
    assert ours.shape == (b, ways * 6, ways)
    for e in range(b):  # Tian et al.'s eval/meta_eval.py: normalize, then fit per episode
        unit = lambda x: (x / x.pow(2).sum(1, keepdim=True).sqrt()).numpy()
        clf = LogisticRegression(random_state=0, solver="lbfgs", max_iter=1000)
        clf.fit(unit(support[e]), labels[e].numpy())
        expected = clf.predict_proba(unit(query[e]))
        assert np.allclose(ours[e].exp().numpy(), expected, atol=1e-5)
        assert np.array_equal(ours[e].argmax(-1).numpy(), clf.predict(unit(query[e])))


def test_rfs_without_scikit_learn_is_one_sentence(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    with pytest.raises(FewshotError, match="needs scikit-learn.*pip install scikit-learn"):
        Baseline(Conv4(hidden=8), 5, support_classifier="logistic")


# ---------------------------------------------------------------- the model's pieces


def test_pretraining_head_and_its_checkpoint():
    algo = Baseline(Conv4(hidden=8), 5, classifier="cosine")
    algo.set_base_classes(300)
    assert algo.head["weight"].shape == (300, 8) and algo.head_scale(300) == 10.0
    assert algo.head_scale(5) == 2.0  # Chen et al.'s distLinear: 2 up to 200 classes
    batch = torch.rand(6, 1, 28, 28)
    from fewshot_cli.episode import LabelledBatch

    loss, metrics = algo.meta_loss(LabelledBatch(batch, torch.arange(6), 300))
    loss.backward()
    assert algo.head["weight"].grad is not None and set(metrics) == {"loss", "accuracy"}
    fresh = Baseline(Conv4(hidden=8), 5, classifier="cosine")
    fresh.load_state_dict(algo.state_dict())  # eval rebuilds the head from the weights
    assert torch.equal(fresh.head["weight"], algo.head["weight"])


@pytest.mark.parametrize("options, words", [
    ({"classifier": "knn"}, "algo.classifier=knn is unknown"),
    ({"support_classifier": "svm"}, "algo.support_classifier=svm is unknown"),
    ({"scale": -1}, "algo.scale=-1 must be auto"),
    ({"finetune_steps": 0}, "algo.finetune_steps=0 must be a whole number"),
    ({"finetune_batch": 2.5}, "algo.finetune_batch=2.5 must be a whole number"),
])
def test_bad_options_are_one_sentence(options, words):
    with pytest.raises(FewshotError, match=words):
        Baseline(Conv4(hidden=8), 5, **options)


def test_centroid_support_classifier_is_classifier_baseline():
    """Chen et al. 2021's Classifier-Baseline test: cosine to the class means of the pretrained
    features, the same scores as a cosine ProtoNet on the same backbone."""
    torch.manual_seed(3)
    backbone = Conv4(hidden=8).eval()
    s, q = torch.rand(2, 10, 1, 28, 28), torch.rand(2, 15, 1, 28, 28)
    labels = torch.arange(5).repeat_interleave(2).expand(2, -1)
    with torch.no_grad():
        ours = Baseline(backbone, 5, support_classifier="centroid").predict(s, labels, q, 5)
        theirs = ProtoNet(backbone, 5, distance="cosine").predict(s, labels, q, 5)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_protonet_learns_its_cosine_scale():
    algo = ProtoNet(Conv4(hidden=8), 5, distance="cosine", learn_scale=True)
    assert "scale" in algo.state_dict()
    s, q = torch.rand(2, 5, 1, 28, 28), torch.rand(2, 10, 1, 28, 28)
    logits = algo.predict(s, torch.arange(5).expand(2, -1), q, 5)
    logits.sum().backward()
    assert algo.scale.grad is not None
    assert "scale" not in ProtoNet(Conv4(hidden=8), 5).state_dict()  # old checkpoints load
    with pytest.raises(FewshotError, match="algo.distance=cosine"):
        ProtoNet(Conv4(hidden=8), 5, learn_scale=True)


# ---------------------------------------------------------------- presets

CONF = Path(__file__).resolve().parents[1] / "conf"
FAMILIES = ("baseline", "baselinepp", "rfs", "meta_baseline")


def transfer_presets() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                  if p.stem.rsplit("_", 2)[0] in FAMILIES)


@pytest.mark.parametrize("preset", transfer_presets())
def test_presets_compose_and_build(preset):
    from hydra import compose, initialize_config_dir
    from test_metric_algorithms import random_store

    from fewshot_cli.build import build_algorithm

    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("train", overrides=[f"experiment={preset}"])
    family, data, shape = preset.rsplit("_", 2)
    if shape != "classifier":
        ways, shots = (int(x) for x in shape.rstrip("s").split("w"))
        assert (cfg.eval.ways, cfg.eval.shots) == (ways, shots)
    target = cfg.algo._target_.rsplit(".", 1)[-1]
    assert target == ("ProtoNet" if shape != "classifier" and family == "meta_baseline"
                      else "Baseline")
    if family == "baselinepp":
        assert cfg.algo.classifier == "cosine"
    channels = 3 if data == "miniimagenet" else 1
    store = random_store(classes=2, images=2, size=cfg.dataset.image_size, channels=channels)
    build_algorithm(cfg, store)


def test_a_second_stage_preset_without_init_from_is_one_sentence(cli):
    one_sentence(cli("train", "experiment=meta_baseline_miniimagenet_5w1s"),
                 "add init_from=PATH", "experiment=meta_baseline_miniimagenet_classifier")


# ---------------------------------------------------------------- the CLI on the glyphs

VARIANTS = {
    "baseline": ["algo=baseline"],
    "baselinepp": ["algo=baseline", "algo.classifier=cosine"],
    "rfs": ["algo=rfs"],
}
SHORT = [*TINY, "train.batch_size=32", "train.steps=6", "train.val_every=3"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cli_train_then_eval(cli, tmp_path, name):
    run = tmp_path / "run"
    out = ok(cli("train", *VARIANTS[name], *SHORT, f"hydra.run.dir={run}"))
    assert "val accuracy" in out.stdout
    ok(cli("eval", f"ckpt={run / 'best.pt'}", "eval.shots=2"))
    result = eval_result(run, 5, 2)
    assert result["episodes"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    head = load_checkpoint(run / "best.pt")["model"]["head.weight"]
    assert head.shape[0] == 20  # one row per training class of the glyphs (TINY: 20)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A small algo=baseline run to start other runs from."""
    folder = tmp_path_factory.mktemp("pretrained")
    from conftest import run_cli

    ok(run_cli(["train", "algo=baseline", *SHORT, f"hydra.run.dir={folder / 'run'}"], folder))
    return folder / "run" / "best.pt"


def test_meta_baseline_starts_from_the_pretrained_backbone(cli, tmp_path, pretrained):
    run = tmp_path / "meta"
    ok(cli("train", "algo=protonet", "algo.distance=cosine", "algo.learn_scale=true",
           f"init_from={pretrained}", *TINY, "train.steps=1", "train.val_every=1",
           "train.lr=1e-12", f"hydra.run.dir={run}"))
    state = load_checkpoint(run / "last.pt")
    assert state["init_from"] == {"path": str(pretrained.resolve()), "algo": "baseline",
                                  "step": load_checkpoint(pretrained)["step"]}
    assert state["config"]["init_from"] == str(pretrained)
    source = load_checkpoint(pretrained)["model"]
    for key, value in state["model"].items():  # one step at lr 1e-12: still the source's weights
        if key.startswith("backbone.") and "running_" not in key and value.is_floating_point():
            assert torch.allclose(value, source[key], atol=1e-6), key
    assert "scale" in state["model"]
    ok(cli("eval", f"ckpt={run / 'best.pt'}"))
    # a resume needs the run's own checkpoint only: the source may be gone
    moved = tmp_path / "moved.pt"
    shutil.copy(pretrained, moved)
    run2 = tmp_path / "meta2"
    ok(cli("train", "algo=protonet", f"init_from={moved}", *TINY, "train.steps=2",
           "train.val_every=1", f"hydra.run.dir={run2}"))
    moved.unlink()
    ok(cli("train", f"resume={run2 / 'last.pt'}", "train.steps=3"))
    assert load_checkpoint(run2 / "last.pt")["init_from"]["path"] == str(moved.resolve())


def test_init_from_mistakes_are_one_sentence(cli, tmp_path, pretrained):
    err = one_sentence(cli("train", "algo=protonet", f"init_from={pretrained}", *TINY,
                           "backbone.hidden=16"), "init_from=", "backbone.hidden=8",
                       "[8, 1, 3, 3] there, [16, 1, 3, 3] here")
    assert "Traceback" not in err
    not_conv4 = [a for a in TINY if not a.startswith("backbone.")]
    one_sentence(cli("train", "algo=protonet", f"init_from={pretrained}", *not_conv4,
                     "backbone=resnet12", "backbone.widths=[4,4,4,4]"),
                 "init_from=", "backbone=conv4 backbone.hidden=8")
    one_sentence(cli("train", f"init_from={tmp_path / 'none.pt'}", *TINY), "init_from=",
                 "does not exist")
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    one_sentence(cli("train", f"init_from={tmp_path / 'foreign.pt'}", *TINY), "init_from=",
                 "not a fewshot checkpoint")
    assert not list(tmp_path.glob("outputs/*/*"))  # no run folder left behind


def test_baseline_resumes_to_the_same_weights(cli, tmp_path):
    args = ["algo=baseline", *TINY, "train.batch_size=16", "train.val_every=5",
            "train.scheduler.step_size=7"]
    ok(cli("train", *args, "train.steps=12", f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(cli("train", *args, "train.steps=5", f"hydra.run.dir={tmp_path / 'split'}"))
    ok(cli("train", f"resume={tmp_path / 'split' / 'last.pt'}", "train.steps=12"))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- the time budget


def test_max_minutes_stops_cleanly_and_spans_resumes(cli, tmp_path):
    run = tmp_path / "run"
    out = ok(cli("train", *TINY, "train.steps=100000", "train.val_every=100000",
                 "train.max_minutes=0.001", "train.budget_clock=cpu", f"hydra.run.dir={run}"))
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert 0 < last["step"] < 100000 and best["step"] == last["step"]  # validated, then saved
    assert last["trained_seconds"] >= 0.06
    log = (run / "train.log").read_text()
    assert "train.max_minutes=0.001 of training spent (cpu clock)" in log
    assert "stopped" in out.stdout
    again = ok(cli("train", f"resume={run / 'last.pt'}"))
    assert "nothing to do" in again.stdout
    assert load_checkpoint(run / "last.pt")["step"] == last["step"]


@pytest.mark.parametrize("override, words", [
    ("train.max_minutes=-1", "train.max_minutes=-1 must be a positive number of minutes"),
    ("train.budget_clock=gpu", "train.budget_clock=gpu must be wall or cpu"),
    ("train.batch_size=0", "train.batch_size=0 must be a whole number of at least 1"),
])
def test_budget_and_batch_mistakes_are_one_sentence(cli, override, words):
    one_sentence(cli("train", "algo=baseline", *TINY, override), words)


# ---------------------------------------------------------------- real learning on Omniglot


@pytest.mark.real_data
def test_baseline_learns_on_unseen_omniglot_alphabets(cli, tmp_path, omniglot_root):
    """The acceptance run: algo=baseline on Omniglot's minimal split (background_small1 with
    rotations: 544 classes), then fewshot eval 5-way 1-shot on unseen alphabets (chance 20%)."""
    run = tmp_path / "baseline"
    ok(cli("train", "algo=baseline", "dataset=omniglot", "dataset.split=minimal",
           f"dataset.root={omniglot_root}", "device=cpu", "train.batch_size=64",
           "train.steps=300", "train.val_every=300", "train.val_episodes=50", "eval.ways=5",
           "eval.shots=1", f"hydra.run.dir={run}"))
    print(ok(cli("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=200")).stdout)
    result = eval_result(run, 5, 1)
    assert result["accuracy"] - result["ci95"] >= 0.6, result
