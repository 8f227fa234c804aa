"""Every algorithm with every backbone: checkpoints of an earlier commit load and give the same
numbers, and every combination that composes trains and evaluates or is refused in one
sentence before anything is built."""

from __future__ import annotations

import functools
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import compose
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from fewshot_cli.build import build_algorithm, build_augment, build_dataset, build_optimizer
from fewshot_cli.config import group_targets
from fewshot_cli.data.batches import BatchSampler
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore
from fewshot_cli.episode import BanditTrials, Episode
from fewshot_cli.errors import FewshotError

FIXTURE = Path(__file__).parent / "data" / "algorithms_d01c6ce.pt"
RECORDED = torch.load(FIXTURE, weights_only=True)  # tests/data/make_algorithms_fixture.py
CASES = [name for name in RECORDED if name not in ("commit", "episode")]


@pytest.mark.parametrize("name", CASES)
def test_checkpoints_of_d01c6ce_load_and_give_the_same_numbers(name: str) -> None:
    """The weights' names, the predictions and the first meta-step of every algorithm are
    those of commit d01c6ce (the inner loop was one module then), to rounding: the file was
    written with 2 CPU threads, and a convolution's sums depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the file was written: the sums in the recorded order
    try:
        compare_with_the_recording(name)
    finally:
        torch.set_num_threads(threads)


def compare_with_the_recording(name: str) -> None:
    case, e = RECORDED[name], RECORDED["episode"]
    episode = Episode(e["support"], e["support_y"], e["query"], e["query_y"], 3, 2, 2)
    algo = build_algorithm(OmegaConf.create(case["config"]), {"in_channels": 1, "image_size": 16})
    algo.load_state_dict(case["model"])  # strict: no key renamed, none missing
    algo.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            algo.predict(episode.support, episode.support_y, episode.query, 3), case["logits"])
    algo.set_step(0)
    algo.train()
    torch.manual_seed(1)
    loss, _ = algo.meta_loss(episode)
    torch.testing.assert_close(loss.detach(), case["loss"])
    named = [(n, p) for n, p in algo.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    got = {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}
    assert got.keys() == case["grads"].keys()
    for n, g in got.items():  # rounding of sums over a whole tensor: relative to its largest
        want = case["grads"][n]  # (conv biases before BatchNorm: 0 but for rounding, ~1e-7)
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 + 1e-4 * float(want.abs().max()))


# ---------------------------------------------------------------- the matrix

# Every image backbone option, tiny; koch needs images of 65 px, the others take 16.
BACKBONES = {
    "conv4": ["backbone=conv4", "backbone.hidden=4"],
    "conv4_32": ["backbone=conv4_32", "backbone.hidden=4"],
    "conv4_relation": ["backbone=conv4_relation", "backbone.hidden=4"],
    "koch": ["backbone=koch", "backbone.widths=[4,4,4,4]", "backbone.fc=8"],
    "resnet12": ["backbone=resnet12", "backbone.widths=[4,4,4,4]"],
    "resnet12_dropblock": ["backbone=resnet12", "backbone.widths=[4,4,4,4]",
                           "backbone.keep_prob=0.9"],
    "resnet12_map": ["backbone=resnet12", "backbone.widths=[4,4,4,4]", "backbone.avg_pool=false"],
    # untrained (weights=null): nothing is downloaded
    "torchvision": ["backbone=torchvision", "backbone.arch=resnet18", "backbone.weights=null"],
}
# The options of each algorithm that change its graph, crossed with each other.
BATCHING = {"algo.batching": ["vmap", "loop"]}
BATCHNORM = {"algo.batchnorm": ["task", "support"]}
OPTIONS: dict[str, dict[str, list]] = {
    "protonet": {}, "relation": {}, "siamese": {}, "matching": {"algo.fce": [False, True]},
    "maml": {"algo.first_order": [False, True], **BATCHNORM, **BATCHING},
    "fomaml": BATCHING, "metasgd": BATCHING, "anil": {**BATCHNORM, **BATCHING},
    "meta_lstm": {**BATCHNORM, **BATCHING}, "reptile": {**BATCHNORM, **BATCHING},
    "weightgen": {"algo.finetune_steps": [0, 1], **BATCHING},
    "baseline": {"algo.classifier": ["linear", "cosine"]}, "rfs": {},
}
# ... and MAML's memory options: chunks of vmapped tasks, recomputed inner steps. Inner loops
# are short (the graph of one step is the graph of twelve).
SHORT = {"maml": {"algo.eval_inner_steps": 1}, "meta_lstm": {"algo.inner_steps": 2},
         "reptile": {"algo.inner_steps": 2, "algo.eval_inner_steps": 2}}
EXTRA = {"maml": [{"algo.task_chunk": 1, "algo.batching": "vmap"},
                  {"algo.checkpoint_steps": True, "algo.batching": "vmap"}]}
# Backbones whose graph under the options is another row's: conv4_32 is conv4 at these widths,
# resnet12 is resnet12_dropblock without the random layers, resnet12_map ends in a flatten as
# conv4 does; torchvision's networks are plain stacks of such layers. They run each algorithm
# with its defaults.
DEFAULTS_ONLY = {"conv4_32", "resnet12", "resnet12_map", "torchvision"}
# Relation Networks compare feature maps of at least 4x4; only conv4_relation keeps one at 16 px.
# Meta-LSTM's coordinate-wise LSTM on a full ResNet-18 learner would need tens of GiB per task.
REFUSED = {**{("relation", name): "backbone=conv4_relation" for name in BACKBONES
              if name != "conv4_relation"},
           ("meta_lstm", "torchvision"): "backbone=conv4_32"}


def option_sets(algo: str, backbone: str) -> list[dict]:
    if backbone in DEFAULTS_ONLY:
        return [{}]
    axes = OPTIONS[algo]
    combos = [dict(zip(axes, values, strict=True)) for values in product(*axes.values())]
    return combos + EXTRA.get(algo, [])


def test_the_matrix_covers_every_algorithm_and_backbone_of_the_config_tree() -> None:
    assert set(OPTIONS) | {"rl2"} == set(group_targets("algo"))
    assert {args[0].split("=")[1] for args in BACKBONES.values()} | {"gru"} == set(
        group_targets("backbone"))


@functools.cache
def composed(algo: str, backbone: str) -> DictConfig:
    return compose([f"algo={algo}", *BACKBONES[backbone], "dataset=glyphs", "train.ways=3",
                    "train.shots=2", "train.queries=1", "train.meta_batch=2"])


@functools.cache
def tiny_episode(size: int) -> Episode:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 1, size, size), generator=g, dtype=torch.uint8)
    return EpisodeSampler(ClassStore(images, [f"c{i}" for i in range(6)]), 3, 2, 1, 2,
                          seed=0).sample()


@functools.cache
def tiny_batch(size: int) -> Any:
    """Labelled images of the episode's six classes, for the transfer baselines' training."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 1, size, size), generator=g, dtype=torch.uint8)
    return BatchSampler(ClassStore(images, [f"c{i}" for i in range(6)]), 4, seed=0)


def step_and_evaluate(cfg: DictConfig, inputs: dict, tasks: Any) -> None:
    """What the trainer does for one meta-step (a minibatch step for an algorithm that trains
    on labelled minibatches), then what the evaluator does."""
    algo = build_algorithm(cfg, inputs, torch.device("cpu"))
    batches = tiny_batch(inputs["image_size"]) if algo.trains_on == "batches" else None
    if batches is not None:
        algo.set_base_classes(batches.classes)
    optimizer, _ = build_optimizer(cfg, algo)
    algo.train()
    algo.set_step(1)
    loss, metrics = algo.meta_loss(batches.sample() if batches is not None else tasks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values())
    assert all(torch.isfinite(p).all() for p in algo.parameters())
    algo.eval()
    with torch.no_grad():
        scores = algo.score(tasks)
    assert scores.shape == (tasks.meta_batch,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("algo", list(OPTIONS))
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_combination_trains_and_evaluates_or_is_refused_in_one_sentence(
        algo: str, backbone: str) -> None:
    size = 65 if backbone == "koch" else 16
    for options in option_sets(algo, backbone):
        cfg = composed(algo, backbone).copy()
        for key, value in {**SHORT.get(algo, {}), **options}.items():
            OmegaConf.update(cfg, key, value)
        torch.manual_seed(0)
        try:
            step_and_evaluate(cfg, {"in_channels": 1, "image_size": size}, tiny_episode(size))
        except FewshotError as refusal:
            assert (algo, backbone) in REFUSED, (options, refusal)
            assert "\n" not in str(refusal) and REFUSED[algo, backbone] in str(refusal)
        else:
            assert (algo, backbone) not in REFUSED, options


def test_networks_of_other_kinds_of_task_are_refused_and_rl2_steps_on_bandits() -> None:
    rl2 = compose(["algo=rl2", "dataset=bandits", "train.meta_batch=2"])
    mismatched = [compose(["algo=rl2", "dataset=bandits", "backbone=conv4"]),
                  compose(["algo=maml", "dataset=glyphs", "backbone=gru"])]
    for cfg in mismatched:
        with pytest.raises(FewshotError, match="backbone=") as refusal:
            build_algorithm(cfg, {"in_channels": 1, "image_size": 16})
        assert "\n" not in str(refusal.value)
    g = torch.Generator().manual_seed(0)
    trials = BanditTrials(torch.rand(2, 5, generator=g), torch.rand(2, 10, generator=g),
                          torch.rand(2, 10, generator=g), seed=0)
    step_and_evaluate(rl2, {"arms": 5}, trials)


def test_maml_trains_resnet12_with_dropblock_through_the_cli(cli) -> None:
    """The issue's command: DropBlock inside the functional inner loop used to die in
    torch.func with a raw traceback (an in-place update of a captured counter)."""
    done = cli("train", "algo=maml", "backbone=resnet12", "backbone.keep_prob=0.9",
               "backbone.widths=[4,4,4,4]", "backbone.anneal_steps=2", "dataset=glyphs",
               "dataset.image_size=16", "train.queries=1", "train.steps=2", "train.val_every=2",
               "train.val_episodes=2", "eval.queries=1", "device=cpu")
    assert done.returncode == 0, done.stderr[-3000:]


def recorded_arguments(monkeypatch: pytest.MonkeyPatch, *targets: str) -> dict[str, Any]:
    """A dict that fills with the keyword arguments the classes ``targets`` are built with."""
    given: dict[str, Any] = {}

    def recording(init: Any) -> Any:
        def record(self, *args: Any, **kwargs: Any) -> None:
            given.update(kwargs)
            init(self, *args, **kwargs)
        return record

    for target in targets:
        cls = get_class(target)
        monkeypatch.setattr(cls, "__init__", recording(cls.__init__))
    return given


def plain(value: Any) -> bool:
    """Built-in values all the way down: no DictConfig or ListConfig."""
    if isinstance(value, DictConfig | ListConfig):
        return False
    if isinstance(value, dict):
        return all(plain(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(plain(v) for v in value)
    return True


@pytest.mark.parametrize("algo, backbone", [
    *((name, None) for name in sorted(group_targets("algo"))),
    *(("protonet", name) for name in sorted(group_targets("backbone")) if name != "gru")])
def test_algorithms_and_backbones_are_given_plain_values(algo: str, backbone: str | None,
                                                         monkeypatch) -> None:
    cfg = compose([f"algo={algo}", "dataset=bandits" if algo == "rl2" else "dataset=glyphs",
                   *([f"backbone={backbone}"] if backbone else []),
                   *(["backbone.weights=null"] if backbone == "torchvision" else [])])
    given = recorded_arguments(monkeypatch, cfg.algo._target_, cfg.backbone._target_)
    inputs = {"arms": 5} if algo == "rl2" else {"in_channels": 1,
                                                  "image_size": 65 if backbone == "koch" else 28}
    build_algorithm(cfg, inputs)
    assert given and all(plain(v) for v in given.values()), given


@pytest.mark.parametrize("dataset, augment", [
    *((name, "none") for name in sorted(group_targets("dataset"))),
    *(("glyphs", name) for name in sorted(group_targets("augment")))])
def test_data_sets_and_augmentations_are_given_plain_values(dataset: str, augment: str,
                                                            monkeypatch) -> None:
    """Config stops at build.py: readers and augmentations get dicts and lists, never
    DictConfig or ListConfig (nor are their files read here)."""
    cfg = compose([f"dataset={dataset}", f"augment={augment}",
                   *(["algo=rl2"] if dataset == "bandits" else []),
                   *(["dataset.root=unused"] if dataset == "folder" else [])])
    given = recorded_arguments(monkeypatch, cfg.dataset._target_, cfg.augment._target_)
    build_dataset(cfg)
    build_augment(cfg)
    assert all(plain(v) for v in given.values()), given
