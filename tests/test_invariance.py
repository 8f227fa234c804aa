"""What a figure depends on: the data and the model, nothing else.

The invariance matrix. Each property below is stated once, with its tolerance, and run over
every image algorithm of ``ALGORITHMS`` (and the backbone options of ``BACKBONES`` that change
the graph). A new algorithm joins every property by being added to ``ALGORITHMS``; where an
algorithm legitimately depends on something a property varies, ``EXCEPTIONS`` names it with the
paper's reason, and docs/runs.md ("What a figure depends on") says so.

Properties (sections below, in this order):
- names and order: class folder names (labels permuted consistently) and file order;
- how the work is split: eval.batch, algo.batching, algo.checkpoint_steps, torchrun processes;
- how the pixels are stored: pickle, PNGs, folders at every image size; EXIF orientation;
- copies: a support image given k times;
- resume: stopped and resumed equals uninterrupted;
- the protocol key: every eval/device option either passes an invariance or is in the key.
"""

from __future__ import annotations

import copy
import csv
import functools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_cli
from helpers import TINY, compose, ok, one_sentence
from image_folder import make_image_folder
from omegaconf import DictConfig, OmegaConf
from test_distributed import SMALL as DISTRIBUTED_SMALL
from test_distributed import _free_port as free_port
from test_distributed import assert_same_weights, finished, noise_folder, torchrun
from test_matrix import tiny_batch, tiny_episode
from test_predict import maml  # noqa: F401 (the fixture: a MAML run trained a few steps)

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.build import build_algorithm, build_optimizer
from fewshot_cli.data.store import ClassStore
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.distributed import Processes
from fewshot_cli.engine.trainer import MetaTrainer, seeded
from fewshot_cli.predict import classify

# The image algorithms, each with the overrides that make it build on the tiny glyphs used
# here (the options of the matrix in test_matrix.py choose the graph). A new algorithm joins
# every property below by being added here.
ALGORITHMS: dict[str, list[str]] = {
    "protonet": [],
    "matching": [],
    "matching_fce": ["algo=matching", "algo.fce=true"],
    "relation": ["backbone=conv4_relation"],
    "siamese": [],
    "maml": ["algo.eval_inner_steps=1"],
    "fomaml": [],
    "metasgd": [],
    "anil": [],
    "meta_lstm": ["algo.inner_steps=2"],
    "reptile": ["algo.inner_steps=2", "algo.eval_inner_steps=2"],
    "weightgen": [],
    "baseline": [],
    "rfs": [],
}

# Backbone options that change the graph: random layers (dropout, DropBlock) and a pretrained-
# shaped network. Tiny widths; nothing downloaded.
BACKBONES: dict[str, list[str]] = {
    "conv4": ["backbone=conv4", "backbone.hidden=4"],
    "resnet12_dropblock": ["backbone=resnet12", "backbone.widths=[4,4,4,4]",
                           "backbone.keep_prob=0.9"],
    "torchvision": ["backbone=torchvision", "backbone.arch=resnet18", "backbone.weights=null"],
}

# (property, algorithm) -> why the algorithm legitimately depends on what the property varies,
# with the paper that says so. Every entry is listed in docs/runs.md.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def algorithm_overrides(name: str) -> list[str]:
    """The overrides that select algorithm ``name`` of ``ALGORITHMS``."""
    extra = ALGORITHMS[name]
    chosen = [o for o in extra if o.startswith("algo=")]
    return ([] if chosen else [f"algo={name}"]) + extra


def test_the_list_names_every_image_algorithm_of_the_config_tree() -> None:
    from fewshot_cli.config import group_targets

    algos = {o.split("=")[1] for name in ALGORITHMS for o in algorithm_overrides(name)
             if o.startswith("algo=")}
    assert algos | {"rl2"} == set(group_targets("algo"))


def exception(prop: str, name: str) -> None:
    """Skip (with the documented reason) where ``name`` legitimately fails ``prop``."""
    if (prop, name) in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[prop, name])


# ================================================================ names and order
# (section: names and order)

# Every algorithm trained a few steps on tiny glyph-sized episodes (3 ways, 2 shots), then asked
# the same question with its classes renamed, its support files reordered, its support images
# copied. Scores are compared as ``predict`` returns them, computed in
# float64: float32 rounding of sums taken in another order grows through an untrained network's
# BatchNorm over a few 1x1 maps (5e-4 on ResNet-18 at 16 px, 0 in float64), and would hide a
# real dependence as small as that.
TRAINED_SHAPE = ["dataset=glyphs", "train.ways=3", "train.shots=2", "train.queries=1",
                 "train.meta_batch=2", "eval.ways=3", "device=cpu"]


@functools.cache
def trained(name: str, backbone: str | None = None, steps: int = 3) -> FewShotAlgorithm:
    """Algorithm ``name`` of ``ALGORITHMS`` (on ``BACKBONES[backbone]``, else its own tiny
    default) after ``steps`` meta-steps on the tiny episodes of test_matrix.py, in eval mode and
    float64."""
    tiny = ["backbone.hidden=4"] if backbone is None else BACKBONES[backbone]
    if backbone is None and name == "relation":
        tiny = []  # its own encoder, conv4_relation, chosen in ALGORITHMS
    cfg = compose([*algorithm_overrides(name), *tiny, *TRAINED_SHAPE])
    torch.manual_seed(0)
    algo = build_algorithm(cfg, {"in_channels": 1, "image_size": 16}, torch.device("cpu"))
    batches = tiny_batch(16) if algo.trains_on == "batches" else None
    if batches is not None:
        algo.set_base_classes(batches.classes)
    optimizer, _ = build_optimizer(cfg, algo)
    algo.train()
    for step in range(steps):
        algo.set_step(step)
        loss, _ = algo.meta_loss(batches.sample() if batches is not None else tiny_episode(16))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return algo.double().eval()


def scores(algo: FewShotAlgorithm, support: torch.Tensor, support_y: torch.Tensor,
           query: torch.Tensor, ways: int = 3) -> torch.Tensor:
    """The scores ``[B, Q, ways]`` of one seeded (random layers) forward pass in float64:
    logits, log-probabilities or relation scores, whatever ``predict`` returns."""
    torch.manual_seed(0)
    with torch.no_grad():
        return algo.predict(support.double(), support_y, query.double(), ways).double()


ALGORITHM_CASES = list(ALGORITHMS)
# The backbone matters to the order of the support only through its BatchNorm statistics and
# random layers: each backbone under one metric and one inner-loop algorithm.
BACKBONE_CASES = [(name, backbone) for name in ("protonet", "maml") for backbone in BACKBONES]


@pytest.mark.parametrize("name", ALGORITHM_CASES)
def test_permuting_the_class_labels_permutes_the_scores(name: str) -> None:
    """Labels given to the classes in another order: each class keeps its scores, to
    1e-6 (float64; the float32 parts of an algorithm round)."""
    exception("labels", name)
    algo, episode = trained(name), tiny_episode(16)
    before = scores(algo, episode.support, episode.support_y, episode.query)
    relabel = torch.tensor([2, 0, 1])  # class c is now called relabel[c]
    after = scores(algo, episode.support, relabel[episode.support_y], episode.query)
    torch.testing.assert_close(after[..., relabel], before, atol=1e-6, rtol=0)


def reorder_within_classes(support: torch.Tensor, support_y: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The support rows in another order, each class's images reversed and the classes'
    rows interleaved: ``[B, M, ...]`` and labels ``[B, M]``."""
    order = torch.arange(support.shape[1]).flip(0)
    return support[:, order], support_y[:, order]


@pytest.mark.parametrize("name, backbone", [*((n, None) for n in ALGORITHM_CASES),
                                            *BACKBONE_CASES])
def test_the_order_of_the_support_images_changes_no_score(name: str, backbone: str | None
                                                                ) -> None:
    """The support images in another order (within each class and across classes): the same
    scores to 1e-6 (float64)."""
    exception("order", name)
    # one meta-step on a backbone of BACKBONES: MAML on ResNet-18 takes seconds a step
    algo, episode = trained(name, backbone, steps=1 if backbone else 3), tiny_episode(16)
    before = scores(algo, episode.support, episode.support_y, episode.query)
    after = scores(algo, *reorder_within_classes(episode.support, episode.support_y),
                          episode.query)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


# Where an algorithm legitimately depends on the labels or the order it is given (fewshot
# predict removes both: content order, averaged assignments), with the paper's reason.
BOUND_HEAD = ("the N-way head's output i is trained as label i (Finn et al. 2017, section 3.1); "
              "the meta-learned initialisation is symmetric over labels only in expectation over "
              "the sampler's random assignments (Ye & Chao 2022); fewshot predict averages over "
              "assignments")
NEW_HEAD = ("a new linear head is fine-tuned on the support from one seeded initialisation, row i "
            "for label i, by SGD on minibatches of 4 support images drawn by position (Chen et "
            "al. 2019, section 3.1)")
MINIBATCHES = ("each inner step reads a minibatch of algo.eval_inner_batch support images drawn by "
               "position from a fixed seed (Nichol et al. 2018, as openai/supervised-reptile's "
               "_mini_batches); another order is another draw")
FULL_CONTEXT = ("the full-context embedding g reads the support set in order with a bidirectional "
                "LSTM (Vinyals et al. 2016, section 2.1.2)")
EXCEPTIONS.update({
    **{("labels", name): BOUND_HEAD for name in ("maml", "fomaml", "metasgd", "anil",
                                                 "meta_lstm", "reptile")},
    ("labels", "baseline"): NEW_HEAD,
    ("order", "matching_fce"): FULL_CONTEXT,
    ("order", "reptile"): MINIBATCHES,
    ("order", "baseline"): NEW_HEAD,
})


def test_the_label_exceptions_are_the_models_that_bind_classes_to_outputs() -> None:
    """fewshot predict averages over assignments exactly where labels are an exception."""
    bound = {name for name in ALGORITHMS if trained(name).binds_classes_to_outputs}
    assert bound == {name for prop, name in EXCEPTIONS if prop == "labels"}


def support_store(seed: int = 1) -> ClassStore:
    """A support set of 3 classes of 2, 1 and 3 random 16 px images (unequal, as in predict)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (3, 3, 1, 16, 16), dtype=torch.uint8, generator=generator)
    return ClassStore(pixels, ["cat", "dog", "owl"], counts=torch.tensor([2, 1, 3]))


def renamed(store: ClassStore) -> tuple[ClassStore, torch.Tensor]:
    """``store`` with its classes renamed so that they sort the other way round, and its files
    in another order within each class; the index in ``store`` of each class of the result."""
    order = torch.arange(store.num_classes).flip(0)
    images = torch.zeros_like(store.images)
    for new, c in enumerate(order.tolist()):
        n = int(store.counts[c])
        images[new, :n] = store.images[c, :n].flip(0)
    names = [f"{chr(ord('z') - new)}_{store.names[c]}" for new, c in enumerate(order.tolist())]
    return ClassStore(images, names, store.counts[order]), order


@pytest.mark.parametrize("name", ALGORITHM_CASES)
def test_fewshot_predict_gives_the_same_answers_whatever_the_names_and_file_order(name: str
                                                                                    ) -> None:
    """The function behind fewshot predict: the support folders renamed (another label for
    each class) and their files in another order give each class the very same probability, to
    1e-6 (float32; the model is given the same tensors)."""
    algo = copy.deepcopy(trained(name)).float()
    support = support_store()
    query = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    before = classify(algo, support, query, cpu)
    other, order = renamed(support)
    torch.manual_seed(0)
    after = classify(algo, other, query, cpu)
    torch.testing.assert_close(after, before[:, order], atol=1e-6, rtol=0)


def test_renaming_the_support_folders_changes_no_maml_answer(fewshot, maml, tmp_path  # noqa: F811
                                                             ) -> None:
    """Issue 28 through the CLI: renaming the support folders changed 10 of 12 MAML answers
    (most queries went to whichever class sorted first). The folders renamed so that they sort
    the other way round, and the files renamed so that they do too: the same class and the
    same probability for every query, to 1e-6."""
    support = make_image_folder(tmp_path / "support", {"round": 3, "square": 2}, seed=3)
    query = make_image_folder(tmp_path / "query", {"q": 12}, seed=4) / "q"
    other = tmp_path / "renamed"
    for folder, new in (("round", "z_round"), ("square", "a_square")):
        files = sorted((support / folder).iterdir())
        (other / new).mkdir(parents=True)
        for i, f in enumerate(files):  # reversed: the last file now sorts first
            (other / new / f"{len(files) - i:03d}{f.suffix}").write_bytes(f.read_bytes())

    def answers(folder: Path) -> dict[str, tuple[str, float]]:
        out = tmp_path / f"{folder.name}.csv"
        assert fewshot("predict", f"ckpt={maml}", f"support={folder}", f"query={query}",
                       f"out={out}").returncode == 0
        with open(out, newline="") as f:
            return {Path(r["file"]).name: (r["predicted"].removeprefix("z_").removeprefix("a_"),
                                           float(r["probability"])) for r in csv.DictReader(f)}

    before, after = answers(support), answers(other)
    assert {f: c for f, (c, _) in after.items()} == {f: c for f, (c, _) in before.items()}
    assert {f: p for f, (_, p) in after.items()} == pytest.approx(
        {f: p for f, (_, p) in before.items()}, abs=1e-6)
# (section: how the work is split)
#
# Tolerance: float32 rounding of sums taken in another order (another batch shape, another
# process): relative 1e-4 and absolute 1e-5 plus 1e-4 of the tensor's largest value (the
# gradients of conv biases before BatchNorm are 0 but for rounding). Random layers included: a
# random draw belongs to a task of the episode (its seed, fewshot_cli.draws), never to a batch
# slot, a chunk, a rank or a recomputation.


def split_config(name: str, backbone: str) -> DictConfig:
    """Algorithm ``name`` on ``backbone`` for the tiny 3-way 2-shot episodes of test_matrix."""
    return compose([*algorithm_overrides(name), *BACKBONES[backbone], "dataset=glyphs",
                    "train.ways=3", "train.shots=2", "train.queries=1", "train.meta_batch=2",
                    *(REPTILE_SGD if name == "reptile" else [])])


# Reptile with minibatches of the support set (its own random draw), and its inner Adam replaced
# by SGD: Adam's normalisation turns the rounding of gradients whose true value is 0 (conv
# biases before BatchNorm) into steps of ±lr, 2e-3 here, which shows nothing about the split.
REPTILE_SGD = ["algo.eval_inner_batch=4", "algo.inner_batch=4", "~algo.update_rule.betas",
               "algo.update_rule._target_=fewshot_cli.algorithms.inner_loop.SGD"]


def refused(name: str, backbone: str) -> bool:
    """Whether test_matrix records the pair as refused at build time (Relation on a pooled
    backbone)."""
    from test_matrix import REFUSED

    algo = next(o.split("=")[1] for o in algorithm_overrides(name) if o.startswith("algo="))
    return (algo, backbone) in REFUSED


def ways_of_splitting(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every way of splitting a meta-batch that the algorithm's config offers: ``batching``
    loop and vmap, vmap in chunks of one task, vmap with recomputed inner steps."""
    algo = cfg.algo
    ways: list[dict[str, Any]] = [{}]
    if "batching" in algo:
        ways = [{"algo.batching": "loop"}, {"algo.batching": "vmap"}]
    if "task_chunk" in algo:
        ways.append({"algo.batching": "vmap", "algo.task_chunk": 1})
    if "checkpoint_steps" in algo:
        ways += [{"algo.batching": mode, "algo.checkpoint_steps": True}
                 for mode in ("vmap", "loop")]
    return ways


def built(cfg: DictConfig, options: dict[str, Any]) -> Any:
    """The algorithm of ``cfg`` with ``options``, from torch seed 0 (the same weights)."""
    cfg = cfg.copy()
    for key, value in options.items():
        OmegaConf.update(cfg, key, value)
    torch.manual_seed(0)
    algo = build_algorithm(cfg, {"in_channels": 1, "image_size": 16}, torch.device("cpu"))
    if algo.trains_on == "batches":
        algo.set_base_classes(tiny_batch(16).classes)
    return algo


def training_tasks(algo: Any, step: int = 3) -> Any:
    """Step ``step``'s meta-batch as the trainer hands it over: seeded task by task."""
    tasks = tiny_batch(16).sample() if algo.trains_on == "batches" else tiny_episode(16)
    return seeded(tasks, 0, step)


def meta_gradient(algo: Any, tasks: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    algo.train()
    algo.set_step(3)
    loss, _ = algo.meta_loss(tasks)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in algo.named_parameters()
                           if p.grad is not None}


def assert_rounding(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
                    ) -> None:
    """Equal to float32 rounding (the section's tolerance), tensor by tensor."""
    assert got.keys() == want.keys(), what
    for name, value in got.items():
        scale = float(want[name].abs().max())
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5 + 1e-4 * scale,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def one_task_at_a_time(tasks: Any) -> list[Any]:
    """Each task of a meta-batch alone, as a rank of a job with one task per rank holds it."""
    return [Processes(i, tasks.meta_batch).shard(tasks) for i in range(tasks.meta_batch)]


# ResNet-18 takes seconds per meta-gradient even at 16 px: its crossings run with the slow tests.
SPLIT_BACKBONES = [pytest.param(b, marks=pytest.mark.slow) if b == "torchvision" else b
                   for b in BACKBONES]
# Measured, not a fault of the split: ResNet-18's layer4 sees 1x1 maps of 6 images at 16 px,
# where per-task BatchNorm is so ill-conditioned that the MAML family's loop and vmap
# meta-gradients part by rounding alone (ANIL: 0.07 on 14; MAML: 7330 on 9068), without any
# random layer and before this section's fix alike.
ILL_CONDITIONED = ("ResNet-18's per-task BatchNorm on 1x1 maps of 6 images amplifies rounding "
                   "(no random layer there): loop and vmap agree on no meaningful digit")


@pytest.mark.parametrize("backbone", SPLIT_BACKBONES)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_batching_chunks_and_recomputed_steps_give_the_same_meta_gradient(
        name: str, backbone: str) -> None:
    """``algo.batching`` loop or vmap, ``algo.task_chunk``, ``algo.checkpoint_steps``: the same
    loss and meta-gradient of a seeded meta-batch to rounding, random layers included."""
    exception("how the work is split", name)
    if refused(name, backbone):
        pytest.skip("refused at build time (test_matrix)")
    cfg = split_config(name, backbone)
    if backbone == "torchvision" and "batching" in cfg.algo:
        pytest.skip(ILL_CONDITIONED)
    ways = ways_of_splitting(cfg)
    reference = meta_gradient(built(cfg, ways[0]), training_tasks(built(cfg, ways[0])))
    for options in ways[1:]:
        algo = built(cfg, options)
        loss, grads = meta_gradient(algo, training_tasks(algo))
        assert_rounding({"loss": loss, **grads}, {"loss": reference[0], **reference[1]},
                        str(options))


@pytest.mark.parametrize("backbone", SPLIT_BACKBONES)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_the_evaluation_batch_changes_no_prediction(name: str, backbone: str) -> None:
    """``eval.batch``: a task's logits (so its predictions and the figure) are the same whether
    it is evaluated with the others or alone, to rounding."""
    exception("how the work is split", name)
    if refused(name, backbone):
        pytest.skip("refused at build time (test_matrix)")
    algo = built(split_config(name, backbone), {})
    algo.eval()
    episode = tiny_episode(16)
    with torch.no_grad():
        together = algo.predict(episode.support, episode.support_y, episode.query, 3)
        alone = torch.cat([algo.predict(t.support, t.support_y, t.query, 3)
                           for t in one_task_at_a_time(episode)])
    assert_rounding({"logits": alone}, {"logits": together}, "one task at a time")


def _rank_gradients(rank: int, port: int, cases: list[tuple[str, str]], out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.set_num_threads(1)
    procs = Processes(rank, 2, torch.device("cpu"))
    for name, backbone in cases:
        algo = procs.prepare(built(split_config(name, backbone), {}))
        algo.train()
        algo.set_step(3)
        loss, _ = algo.meta_loss(procs.shard(training_tasks(algo)))
        loss.backward()
        params = [p for p in algo.parameters() if p.requires_grad]
        procs.average_gradients(params, stop=False, bad=torch.tensor(False))
        out[rank, name, backbone] = {n: p.grad.clone() for n, p in algo.named_parameters()
                                     if p.grad is not None}
    dist.destroy_process_group()


def two_processes_against_one(cases: list[tuple[str, str]]) -> None:
    """The averaged meta-gradients of a 2-process job (gloo, as test_distributed's spawned
    ranks) against one process's, for each (algorithm, backbone)."""
    torch.set_num_threads(1)
    with mp.Manager() as manager:
        out = manager.dict()
        # forked, not spawned: the ranks start with this process's imports (seconds, not tens)
        mp.start_processes(_rank_gradients, args=(free_port(), cases, out), nprocs=2,
                           start_method="fork")
        ranks = dict(out)
    for name, backbone in cases:
        algo = built(split_config(name, backbone), {})
        _, reference = meta_gradient(algo, training_tasks(algo))
        for rank in (0, 1):
            assert_rounding(ranks[rank, name, backbone], reference,
                            f"{name} on {backbone}, rank {rank}")


# Without ResNet-18 (ILL_CONDITIONED): its batch statistics of 1x1 maps part one process's
# ProtoNet meta-gradient from two processes' by rounding alone (1.2 on 553, no random layer).
SPLIT_CASES = [(name, backbone) for name in ALGORITHMS for backbone in BACKBONES
               if not refused(name, backbone) and backbone != "torchvision"
               and ("how the work is split", name) not in EXCEPTIONS]
# A representative few for the everyday loop, with dropout and DropBlock: batch-wide BatchNorm
# and DropBlock's rescaling (ProtoNet), an algorithm's own draws (Siamese's pairs).
SPLIT_FEW = [("protonet", "resnet12_dropblock"), ("siamese", "resnet12_dropblock")]


def test_two_processes_give_the_one_process_meta_gradient() -> None:
    """torchrun's 2 processes (gloo): the same meta-gradient as 1 process, to rounding."""
    two_processes_against_one(SPLIT_FEW)


@pytest.mark.slow
def test_two_processes_give_the_one_process_meta_gradient_for_every_algorithm() -> None:
    """As above, for every algorithm on every backbone."""
    two_processes_against_one(SPLIT_CASES)


def tiny_cli_run(name: str, backbone: str, *extra: str) -> list[str]:
    """``fewshot train`` of 2 steps on a noise folder (no max-pooling ties), SGD."""
    small = [o for o in DISTRIBUTED_SMALL if not o.startswith("backbone.")]
    return ["train", *algorithm_overrides(name), *BACKBONES[backbone], *small,
            "dataset=folder", "dataset.image_size=16", "train.ways=3", "eval.ways=3",
            "train.steps=2", "train.val_every=2", "train.val_episodes=4", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["siamese", "maml"])
def test_torchrun_trains_the_weights_one_process_trains(tmp_path: Path, name: str) -> None:
    """``torchrun --nproc_per_node=2`` with dropout and DropBlock: the weights of 1 process
    after 2 steps, to rounding (every rank used to draw the same random numbers)."""
    data = noise_folder(tmp_path / "data")
    args = tiny_cli_run(name, "resnet12_dropblock", f"dataset.root={data}")
    two = torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    ok(run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path,
               env={"OMP_NUM_THREADS": "1"}))
    code, err = finished(two)
    assert code == 0, err[-3000:]
    assert_same_weights(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt", atol=1e-4)


def test_recomputed_inner_steps_train_the_same_weights(fewshot, tmp_path: Path) -> None:
    """``algo.checkpoint_steps=true`` with dropout and DropBlock: the weights of the run
    without it, to rounding. (On the CPU's default ``batching=loop`` it used to differ: the
    recomputing run takes the meta-batch in one piece, the other task by task, and the masks
    came out of torch's one generator in another order.)"""
    data = noise_folder(tmp_path / "data")
    args = tiny_cli_run("maml", "resnet12_dropblock", f"dataset.root={data}")
    for recompute in ("false", "true"):
        ok(fewshot(*args, f"algo.checkpoint_steps={recompute}",
                   f"hydra.run.dir={tmp_path / recompute}"))
    assert_same_weights(tmp_path / "true" / "last.pt", tmp_path / "false" / "last.pt",
                        atol=1e-5)


# ================================================================ how the pixels are stored
# (section: how the pixels are stored)
#
# The same images decode to the same tensors whatever the layout (a miniImageNet pickle of
# decoded pixels, its csv and folder layouts of JPEGs, PNGs in dataset=folder, Omniglot's PNGs,
# a user's files given to fewshot predict), at every dataset.image_size (the source size, two
# down-samplings, an up-sampling), and a JPEG with an EXIF orientation decodes as a viewer
# shows it. Tolerance: none, pixel for pixel (torch.equal): every reader and predict decode
# through one function (images.decode_image, one Lanczos resize, images.squash), and the
# lossy step, JPEG decoding, is the same full-scale libjpeg decode on every path. The property
# is of the input tensors, before any algorithm, so it holds for every entry of ALGORITHMS
# alike. Data sets drawn in memory (glyphs) have no files and are not part of it.

PIXEL_SIZES = (84, 42, 32, 100)
PIXEL_CLASSES, PIXEL_IMAGES = 3, 2


def _photos():
    """wnid -> [(JPEG bytes, the pixels a pickle of it holds: uint8 [84, 84, 3])]: smooth
    random colour images, as miniImageNet's JPEGs and Ren et al.'s pickle of them."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from fewshot_cli.data.miniimagenet import encode_jpeg

    g = torch.Generator().manual_seed(28)
    low = torch.rand(PIXEL_CLASSES * PIXEL_IMAGES, 3, 7, 7, generator=g)
    big = torch.nn.functional.interpolate(low, size=84, mode="bicubic").clamp(0, 1)
    pixels = (big * 255).to(torch.uint8)
    out = {}
    for c in range(PIXEL_CLASSES):
        jpegs = [encode_jpeg(pixels[c * PIXEL_IMAGES + i]) for i in range(PIXEL_IMAGES)]
        out[f"n{c:08d}"] = [(j, np.asarray(Image.open(io.BytesIO(j)).convert("RGB")))
                            for j in jpegs]
    return out


def _layouts(root):
    """The same photos as a miniImageNet pickle, csv and folders layout (train split), a
    dataset=folder tree of PNGs; returns those roots and the support files predict is given."""
    import csv
    import pickle

    import numpy as np
    from PIL import Image

    photos = _photos()
    for name in ("pickle", "csv", "folders", "png"):
        (root / name).mkdir(parents=True)
    with open(root / "csv" / "train.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["filename", "label"])
        (root / "csv" / "images").mkdir()
        for wnid, images in photos.items():
            (root / "folders" / "train" / wnid).mkdir(parents=True)
            (root / "png" / wnid).mkdir()
            for i, (jpeg, array) in enumerate(images):
                (root / "csv" / "images" / f"{wnid}{i:08d}.jpg").write_bytes(jpeg)
                rows.writerow([f"{wnid}{i:08d}.jpg", wnid])
                (root / "folders" / "train" / wnid / f"{i:08d}.jpg").write_bytes(jpeg)
                Image.fromarray(array).save(root / "png" / wnid / f"{i:08d}.png")
    arrays = [a for images in photos.values() for _, a in images]
    class_dict = {w: list(range(c * PIXEL_IMAGES, (c + 1) * PIXEL_IMAGES))
                  for c, w in enumerate(photos)}
    with open(root / "pickle" / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": np.stack(arrays), "class_dict": class_dict}, f, protocol=4)
    return {w: sorted((root / "folders" / "train" / w).iterdir()) for w in photos}, \
        {w: sorted((root / "png" / w).iterdir()) for w in photos}


@pytest.mark.parametrize("size", PIXEL_SIZES)
def test_every_layout_and_predict_decode_the_same_tensors(tmp_path, own_cache, size):
    import torch

    from fewshot_cli.data.folder import Folder
    from fewshot_cli.data.miniimagenet import MiniImageNet
    from fewshot_cli.predict import decode_inputs

    jpegs, pngs = _layouts(tmp_path)
    stores = {layout: MiniImageNet(str(tmp_path / layout), image_size=size,
                                   layout=layout).load("train")
              for layout in ("pickle", "csv", "folders")}
    stores["folder of PNGs"] = Folder(str(tmp_path / "png"), image_size=size, channels=3,
                                      min_images=1).store()
    query = [p for files in jpegs.values() for p in files]
    support, queries = decode_inputs(jpegs, query, size, "RGB")
    stores["predict support"] = support
    stores["predict query"] = queries
    png_support, _ = decode_inputs(pngs, query[:1], size, "RGB")
    stores["predict PNG support"] = png_support
    reference = stores.pop("pickle")
    assert reference.images.shape == (PIXEL_CLASSES, PIXEL_IMAGES, 3, size, size)
    for layout, store in stores.items():
        images = store.images.view(reference.images.shape)
        apart = (images.float() - reference.images.float()).abs().mean()
        assert torch.equal(images, reference.images), \
            f"{layout} differs from the pickle at {size} px (mean {apart:.2f} grey levels)"
        if store.digests is not None:  # the same source pixels: the same content digests
            assert torch.equal(store.digests.view(-1), reference.digests.view(-1)), layout


@pytest.mark.parametrize("size", (12, 6, 20))
def test_omniglot_pngs_decode_as_a_folder_and_predict_decode_them(tmp_path, own_cache, size):
    import torch
    from test_omniglot import make_release

    from fewshot_cli.data.folder import Folder
    from fewshot_cli.data.omniglot import Omniglot
    from fewshot_cli.predict import decode_inputs

    root = make_release(tmp_path / "omniglot", zipped=False,
                        names=("images_background_small1", "images_background_small2"))
    train = Omniglot(str(root), split="minimal", image_size=size).load("train")
    folder = root / "images_background_small1"
    files = {f"{a.name}/{c.name}": sorted(c.iterdir()) for a in sorted(folder.iterdir())
             for c in sorted(a.iterdir())}
    mine = Folder(str(folder), image_size=size, channels=1, min_images=1).store()
    support, _ = decode_inputs(files, files[next(iter(files))][:1], size, "L")
    for other in (mine, support):
        assert other.names == [n.split("/", 1)[1] for n in train.names]
        assert torch.equal(other.images, train.images)
        assert torch.equal(other.digests, train.digests)


def _phone_photo(folder):
    """A JPEG as a phone stores a photo taken upright (sideways pixels, EXIF orientation 6),
    and a PNG of what a viewer shows: the same decoded pixels turned 90 degrees clockwise
    (built apart from the decoder: the same JPEG without the tag, then PIL's transpose)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    upright = Image.new("RGB", (40, 24), (230, 220, 200))
    ImageDraw.Draw(upright).rectangle((3, 2, 14, 20), fill=(20, 60, 160))  # left, not right
    ImageDraw.Draw(upright).ellipse((26, 4, 36, 10), fill=(200, 30, 30))   # top, not bottom
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 24 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    folder.mkdir(parents=True, exist_ok=True)
    stored.save(folder / "phone.jpg", quality=95, exif=exif.tobytes())
    plain = io.BytesIO()
    stored.save(plain, format="JPEG", quality=95)
    decoded = Image.fromarray(np.asarray(Image.open(plain).convert("RGB")))
    decoded.transpose(Image.Transpose.ROTATE_270).save(folder / "shown.png")
    decoded.save(folder / "other.png")  # sideways: another support class for predict
    return folder / "phone.jpg", folder / "shown.png"


@pytest.mark.parametrize("size", (24, 12, 48))
def test_a_jpeg_with_exif_orientation_decodes_as_a_viewer_shows_it(tmp_path, own_cache, size):
    import shutil
    from dataclasses import replace

    import torch

    from fewshot_cli.data.folder import Folder
    from fewshot_cli.data.miniimagenet import MiniImageNet
    from fewshot_cli.predict import decode_inputs

    phone, shown = _phone_photo(tmp_path / "photos")
    for split in ("train", "val", "test"):  # dataset=folder and miniImageNet's folders layout
        for name, source in (("a", phone), ("b", shown)):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            shutil.copy(source, tmp_path / "data" / split / name / f"0{source.suffix}")
    readers = {
        "folder": Folder(str(tmp_path / "data"), image_size=size, channels=3,
                         min_images=1).load("train"),
        "miniimagenet folders": MiniImageNet(str(tmp_path / "data"), image_size=size,
                                             layout="folders").load("train"),
    }
    # predict: the phone photo as the query, what a viewer shows it as a support image
    support, query = decode_inputs({"a": [shown], "b": [tmp_path / "photos" / "other.png"]},
                                   [phone], size, "RGB")
    readers["predict"] = replace(query, images=torch.cat([query.images, support.images[:1]]),
                                 digests=torch.cat([query.digests, support.digests[:1]]),
                                 names=["phone", "shown"], counts=None, origin=None)
    for reader, store in readers.items():
        assert store.images.shape[-2:] == (size, size)
        assert torch.equal(store.images[0, 0], store.images[1, 0]), \
            f"{reader} decodes the phone photo sideways (EXIF orientation 6 ignored)"
        assert store.digests[0, 0] == store.digests[1, 0], reader


@pytest.mark.parametrize("value", ["[0,360]", "[90,450]", "[-90,270]", "[0,90,0]"])
def test_a_quarter_turn_named_twice_is_refused_in_one_sentence(fewshot, value):
    from helpers import compose, one_sentence

    from fewshot_cli.data.glyphs import Glyphs
    from fewshot_cli.data.omniglot import Omniglot
    from fewshot_cli.data.store import ClassStore
    from fewshot_cli.errors import FewshotError
    from fewshot_cli.options import RULES, check

    one_sentence(fewshot("data", "dataset=glyphs", f"dataset.rotations={value}"),
                 f"dataset.rotations={value}", "distinct multiples of 90")
    with pytest.raises(FewshotError, match=r"dataset\.rotations=.* must be a list of distinct"):
        check(compose(["dataset=omniglot", f"dataset.rotations={value}"]), RULES["train"])
    degrees = [int(d) for d in value.strip("[]").split(",")]
    for make in (lambda: Glyphs({"train": 2, "val": 2, "test": 2}, rotations=degrees),
                 lambda: Omniglot("nowhere", rotations=degrees, download=False)):
        with pytest.raises(FewshotError, match=r"dataset\.rotations"):
            make()
    import torch
    store = ClassStore(torch.zeros(2, 1, 1, 4, 4, dtype=torch.uint8), ["a", "b"])
    with pytest.raises(FewshotError, match=r"dataset\.rotations"):
        store.rotated(degrees)


def test_predict_refuses_one_image_under_two_support_classes(tmp_path):
    import shutil

    from image_folder import make_image_folder

    from fewshot_cli.errors import FewshotError
    from fewshot_cli.predict import decode_inputs, support_classes

    support = make_image_folder(tmp_path / "support", {"cat": 2, "dog": 2})
    shutil.copy(support / "cat" / "001.png", support / "dog" / "copy.png")
    shutil.copy(support / "dog" / "000.jpg", support / "dog" / "again.jpg")  # one class: fine
    files = support_classes(support)
    with pytest.raises(FewshotError) as err:
        decode_inputs(files, files["cat"][:1], 16, "RGB")
    sentence = str(err.value)
    assert str(support / "cat" / "001.png") in sentence
    assert str(support / "dog" / "copy.png") in sentence
    assert "again.jpg" not in sentence and "\n" not in sentence


def test_a_cross_domain_eval_on_the_runs_training_classes_is_refused(fewshot, tmp_path):
    """Lake et al.'s test alphabets holding three of the glyph run's training characters (as
    236 of Lake's test characters are in Vinyals et al.'s training split) and one drawing of
    a fourth among new drawings."""
    import json

    import torch
    from helpers import ok, one_sentence
    from PIL import Image

    from fewshot_cli.data.glyphs import Glyphs

    classes = ["dataset.classes.train=6", "dataset.classes.val=3", "dataset.classes.test=3"]
    glyphs = ["dataset=glyphs", *classes, "dataset.images_per_class=4", "backbone.hidden=4",
              "train.ways=2", "train.queries=1", "eval.ways=2", "eval.queries=1",
              "train.steps=1", "train.val_every=1", "train.val_episodes=1", "device=cpu"]
    ok(fewshot("train", *glyphs, f"hydra.run.dir={tmp_path / 'run'}"))
    trained = Glyphs({"train": 6, "val": 3, "test": 3}, images_per_class=4).load("train")
    novel = Glyphs({"train": 6, "val": 3, "test": 6}, images_per_class=4, seed=7).load("test")
    root = tmp_path / "omniglot"
    mixed = torch.cat([novel.images[5, :3], trained.images[3, :1]])  # one trained drawing
    chars = {"images_background/Alpha": [novel.images[0]],
             "images_evaluation/Angelic": [novel.images[1], novel.images[2]],
             "images_evaluation/ULOG": [novel.images[3], novel.images[4],
                                        *trained.images[:3], mixed]}
    for alphabet, drawings in chars.items():
        for c, images in enumerate(drawings):
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d, image in enumerate(images):
                Image.fromarray(image[0].numpy()).save(folder / f"{c + 1:02d}_{d + 1:02d}.png")
    proc = fewshot("eval", f"ckpt={tmp_path / 'run' / 'best.pt'}", "dataset=omniglot_lake",
                   f"dataset.root={root}", "dataset.download=false", "eval.episodes=2")
    one_sentence(proc, "13 of the 24 test images of dataset=omniglot_lake, in 4 of its 6 classes",
                 "trained on", "not be cross-domain")
    # a record from before image digests were kept: whole classes, by their fingerprints
    record = tmp_path / "run" / "split.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k != "train_images"}))
    proc = fewshot("eval", f"ckpt={tmp_path / 'run' / 'best.pt'}", "dataset=omniglot_lake",
                   f"dataset.root={root}", "dataset.download=false", "eval.episodes=2")
    one_sentence(proc, "12 of the 24 test images of dataset=omniglot_lake, in 3 of its 6 classes")
    assert not (tmp_path / "run" / "results.json").exists() or \
        "omniglot" not in (tmp_path / "run" / "results.json").read_text()

# ================================================================ copies
# (section: copies)

def one_shot_episode() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support ``[1, 3, ...]`` (one image of each of 3 classes), its labels, queries ``[1, 3,
    ...]``: the first task of the tiny episode."""
    episode = tiny_episode(16)
    first = episode.support_y[0].diff(prepend=torch.tensor([-1])) != 0  # the first shot of each
    return episode.support[:1, first], episode.support_y[:1, first], episode.query[:1]


def copied(support: torch.Tensor, support_y: torch.Tensor, copies: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Support image i given ``copies[i]`` times, in place."""
    repeats = torch.tensor(copies)
    return support.repeat_interleave(repeats, dim=1), support_y.repeat_interleave(repeats, dim=1)


# Which class representation each paper defines. A mean (ProtoNet's prototype, Snell et al.
# 2017; weightgen's averaged generator inputs, Gidaris & Komodakis 2018; Relation's class map,
# the mean scaled to the trained shots), a maximum (Siamese's most similar support image, Koch
# et al. 2015) or a mean loss with population BatchNorm statistics (the MAML family, every
# class copied equally) counts a copy once. These count every support image as one example:
KERNEL = ("a class's probability sums the attention over its support images (Vinyals et al. "
          "2016, eq. 1, a kernel density over the support set): a copy is one more example")
MEAN_LOSS = ("the inner loss is the mean over the support images (Finn et al. 2017, section "
             "3.1, eq. 3; Ravi & Larochelle 2017) and the support's BatchNorm statistics count "
             "every image: a copy weighs its class more; every class copied equally changes "
             "nothing")
FINETUNED = ("the new head is fine-tuned for 100 epochs of the support set in minibatches of 4 "
             "(Chen et al. 2019): k copies give k times the steps, and weigh their class more")
LOGISTIC = ("scikit-learn's L2-regularised logistic regression minimises C times the summed "
            "losses plus half the squared weights (Tian et al. 2020): copies weigh the data "
            "against the penalty as a larger C, and their class against the others")
EXCEPTIONS.update({
    ("copies", "matching_fce"): FULL_CONTEXT,
    ("copies", "reptile"): MINIBATCHES,
    ("copies", "baseline"): FINETUNED,
    ("copies", "rfs"): LOGISTIC,
    ("copies of one class", "matching"): KERNEL,
    ("copies of one class", "matching_fce"): KERNEL,
    **{("copies of one class", name): MEAN_LOSS for name in ("maml", "fomaml", "metasgd",
                                                             "anil", "meta_lstm")},
    ("copies of one class", "reptile"): MINIBATCHES,
    ("copies of one class", "baseline"): FINETUNED,
    ("copies of one class", "rfs"): LOGISTIC,
})


# The copy patterns: each class's image given 3 times (a 3-shot task of copies), and one class's
# image given 5 times with the others once (an unequal support, as fewshot predict takes).
COPIES = {"copies": [3, 3, 3], "copies of one class": [5, 1, 1]}


@pytest.mark.parametrize("name", ALGORITHM_CASES)
@pytest.mark.parametrize("prop", COPIES)
def test_a_support_image_given_k_times_is_as_given_it_once(prop: str, name: str) -> None:
    """The 1-shot task with support images copied as ``COPIES[prop]`` says classifies as the
    1-shot task, to 1e-6 (float64)."""
    exception(prop, name)
    algo = trained(name)
    support, support_y, query = one_shot_episode()
    once = scores(algo, support, support_y, query)
    torch.testing.assert_close(scores(algo, *copied(support, support_y, COPIES[prop]), query),
                               once, atol=1e-6, rtol=0)


# ================================================================ resume
# (section: resume)
#
# Tolerance: none. A run stopped at step s (Ctrl-C, or train.steps=s) and resumed, with the same
# or a larger train.steps, has the uninterrupted run's weights bit for bit (last.pt and best.pt,
# so the same figure), in the same process and thread count: every random draw is a function of
# the run seed and the step (fewshot_cli.draws) or of a generator the checkpoint restores. A
# schedule the config computed from train.steps (Reptile's outer-step annealing, a
# ${train.steps} scheduler) would stay at the old length: resume refuses the longer run in one
# sentence. The runs validate every step: a run that ends off its validation schedule validates
# there, and that validation can become best.pt, which the uninterrupted run never saw.

RESUME_STEPS = 3  # the uninterrupted run's length; each algorithm stops at step 1 or 2


def resume_run(name: str, *extra: str) -> list[str]:
    """``fewshot train`` of algorithm ``name`` with dropout and DropBlock (its ramp over 2
    steps; Relation on its own backbone), validating every step, on tiny glyphs."""
    random_layers = [] if refused(name, "resnet12_dropblock") else \
        [*BACKBONES["resnet12_dropblock"], "backbone.anneal_steps=2"]
    return ["train", *algorithm_overrides(name), *random_layers,
            *(o for o in TINY if not o.startswith("backbone.")),
            "dataset.image_size=16", "train.ways=3",
            "eval.ways=3", "train.val_every=1", "train.val_episodes=2", "train.queries=1",
            "train.batch_size=4", "train.meta_batch=2", *extra]


def assert_same_run(a: Path, b: Path) -> None:
    """The same last.pt and best.pt weights, bit for bit, and the same best step."""
    for name in ("last.pt", "best.pt"):
        assert_same_weights(a / name, b / name, atol=0)
    assert load_checkpoint(a / "best.pt")["step"] == load_checkpoint(b / "best.pt")["step"]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_run_resumed_with_more_steps_is_the_run_of_that_length(fewshot, tmp_path: Path,
                                                                  name: str) -> None:
    """Stopped at train.steps=s and resumed with train.steps=3: the uninterrupted 3-step run,
    or refused in one sentence where a schedule was computed from train.steps."""
    exception("resume", name)
    stop = 1 + list(ALGORITHMS).index(name) % (RESUME_STEPS - 1)
    ok(fewshot(*resume_run(name, f"train.steps={RESUME_STEPS}"),
               f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(fewshot(*resume_run(name, f"train.steps={stop}"), f"hydra.run.dir={tmp_path / 'run'}"))
    resumed = fewshot("train", f"resume={tmp_path / 'run' / 'last.pt'}",
                      f"train.steps={RESUME_STEPS}")
    follows = load_checkpoint(tmp_path / "run" / "last.pt").get("follows_steps")
    if follows:
        one_sentence(resumed, "resume cannot change train.steps", *follows)
        return
    ok(resumed)
    assert_same_run(tmp_path / "run", tmp_path / "straight")


@pytest.mark.parametrize("name", ["siamese", "maml", "reptile"])
def test_a_run_stopped_by_ctrl_c_and_resumed_is_the_uninterrupted_run(
        fewshot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Ctrl-C after step 1 (last.pt saved, no validation) and resumed: the uninterrupted run."""
    args = resume_run(name, f"train.steps={RESUME_STEPS}")
    ok(fewshot(*args, f"hydra.run.dir={tmp_path / 'straight'}"))
    step = MetaTrainer.train_step

    def ctrl_c_after_step_1(self: MetaTrainer, at: int, stop: bool = False) -> Any:
        metrics = step(self, at, stop)
        if at == 0:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: the loop's handler
        return metrics

    monkeypatch.setattr(MetaTrainer, "train_step", ctrl_c_after_step_1)
    one_sentence(fewshot(*args, f"hydra.run.dir={tmp_path / 'run'}"), "interrupted at step 1")
    monkeypatch.setattr(MetaTrainer, "train_step", step)
    ok(fewshot("train", f"resume={tmp_path / 'run' / 'last.pt'}"))
    assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_a_scheduler_computed_from_train_steps_refuses_a_longer_resume(
        fewshot, tmp_path: Path) -> None:
    """A learning-rate schedule set from ${train.steps} is fixed when the run starts: a resume
    with more steps is refused in one sentence naming it, one with the same steps goes on."""
    args = [*resume_run("protonet", "train.steps=1"),
            "train.scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR",
            "~train.scheduler.step_size", "~train.scheduler.gamma",
            "+train.scheduler.T_max=${train.steps}", f"hydra.run.dir={tmp_path / 'run'}"]
    ok(fewshot(*args))
    last = tmp_path / "run" / "last.pt"
    one_sentence(fewshot("train", f"resume={last}", "train.steps=2"),
                 "resume cannot change train.steps from 1 to 2", "train.scheduler.T_max")
    ok(fewshot("train", f"resume={last}", "train.steps=1"))

# ================================================================ the protocol key
# (section: the protocol key)
# Every eval.* and device.* option of the config tree (read from conf/, so a new one is caught)
# either changes the protocol record that keys a figure in results.json, and so its column in
# fewshot report, or is listed in INVARIANT_OPTIONS with the property that shows it leaves the
# figure as it is. An option in neither fails the test.

# option -> the property it passes (tolerance as that property states).
INVARIANT_OPTIONS: dict[str, str] = {
    "eval.batch": "how the work is split",
    "device.type": "the protocol key (fp32 on another device: rounding only)",
    "device.memory_format": "the protocol key (fp32 in another weight layout: rounding only)",
    "device.threads": "the protocol key (fp32 on another number of threads: rounding only)",
}
# option -> two values whose figures must be keyed apart.
KEYED_OPTIONS: dict[str, tuple[object, object]] = {
    "eval.ways": (5, 3), "eval.shots": (1, 2), "eval.queries": (15, 5),
    "eval.episodes": (600, 100), "eval.seed": (2024, 1), "eval.within_group": (False, True),
    "eval.distinct_drawers": (False, True), "eval.rotations": ([0], [0, 90, 180, 270]),
    "eval.query_statistics": ("inductive", "transductive"),
    "device.precision": ("fp32", "bf16"),
}
# How far the per-episode accuracies of one model may move when only the rounding changes (the
# same fp32 arithmetic in another order): a query whose two best classes tie to 1e-6 may flip.
ROUNDING = 1e-6


def eval_and_device_options() -> set[str]:
    """Every ``eval.*`` and ``device.*`` key of the config tree: fewshot eval's, fewshot
    train's eval section, and every device option's."""
    from omegaconf import OmegaConf

    from fewshot_cli.config import conf_dir

    keys = {f"eval.{k}" for name in ("eval", "train")
            for k in OmegaConf.load(conf_dir() / f"{name}.yaml").get("eval", {})}
    return keys | {f"device.{k}" for path in (conf_dir() / "device").glob("*.yaml")
                   for k in OmegaConf.load(path) if k != "defaults"}


def test_every_eval_and_device_option_is_keyed_or_passes_an_invariance() -> None:
    options = eval_and_device_options()
    unclaimed = options - set(KEYED_OPTIONS) - set(INVARIANT_OPTIONS)
    assert not unclaimed, f"put each of {sorted(unclaimed)} into the results key " \
        "(results.protocol) or name the invariance it passes in INVARIANT_OPTIONS"
    assert not set(KEYED_OPTIONS) & set(INVARIANT_OPTIONS)
    assert set(KEYED_OPTIONS) | set(INVARIANT_OPTIONS) <= options, "a listed option is gone"


@pytest.mark.parametrize("option", sorted(KEYED_OPTIONS))
def test_a_keyed_option_keys_its_figures_apart(option: str) -> None:
    """The protocol record fewshot eval writes differs between the option's two values, and so
    do their keys in results.json where the words show the option."""
    import copy

    from helpers import TINY, plain

    from fewshot_cli.results import protocol

    section, key = option.split(".")
    trained = plain(TINY)  # fewshot eval's run config: the stored one, with its options laid over

    def record(value: object) -> dict:
        config = copy.deepcopy(trained)
        config[section][key] = value
        wanted = config["eval"].get("query_statistics")  # train.yaml has none: the model's own
        return protocol(config, wanted or "inductive", device=config["device"])

    first, second = (record(v) for v in KEYED_OPTIONS[option])
    assert first != second, f"{option} changes the figure but not its key"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A 2-step ProtoNet run on the tiny glyphs (its folder)."""
    from conftest import run_cli
    from helpers import TINY, ok

    folder = tmp_path_factory.mktemp("protocol")
    ok(run_cli(["train", *TINY, "train.steps=2", "train.val_every=2",
                f"hydra.run.dir={folder / 'run'}"], folder))
    return folder / "run"


def test_a_bf16_figure_is_kept_beside_the_fp32_one_and_reported_apart(
        tiny_run, fewshot, monkeypatch: pytest.MonkeyPatch) -> None:
    """device.precision=bf16 moves a figure by more than rounding: it gets its own entry in
    results.json (not the fp32 one replaced) and its own column in fewshot report."""
    import json
    import shutil

    from helpers import ok

    from fewshot_cli.engine import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda: True)  # emulated here: slow, but right
    run = shutil.copytree(tiny_run, tiny_run.parent.parent / f"bf16-{id(monkeypatch)}")
    for precision in ("fp32", "bf16"):
        ok(fewshot("eval", f"ckpt={run / 'best.pt'}", f"device.precision={precision}"))
    entries = json.loads((run / "results.json").read_text())["best.pt"]
    assert len(entries) == 2, f"the bf16 figure replaced the fp32 one: {list(entries)}"
    assert sorted(e["protocol"]["precision"] for e in entries.values()) == ["bf16", "fp32"], \
        list(entries)
    shown = ok(fewshot("report", str(run))).stdout
    assert "device.precision=bf16" in shown, shown


def fixed_scores(overrides: list[str], device: str = "cpu") -> object:
    """Per-episode test accuracies ``[8]`` of the untrained model of ``overrides`` (the same
    weights each call) on fixed test episodes of the tiny glyphs, as fewshot eval scores them."""
    import torch
    from helpers import TINY, compose

    from fewshot_cli.build import build_algorithm, build_dataset, task_shape
    from fewshot_cli.engine.metrics import score_tasks

    cfg = compose([*TINY, *overrides])
    dataset = build_dataset(cfg)
    torch.manual_seed(0)
    algo = build_algorithm(cfg, dataset.input_spec(), torch.device(device))
    tasks = dataset.sampler("test", task_shape(cfg.eval), 4, torch.device(device), prefix="eval")
    return score_tasks(algo, tasks.fixed(8, seed=cfg.eval.seed))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_the_weight_layout_leaves_the_figure_as_it_is(name: str) -> None:
    exception("the protocol key", name)
    layouts = [fixed_scores([*algorithm_overrides(name), f"device.memory_format={layout}"])
               for layout in ("contiguous", "channels_last")]
    assert (layouts[0] - layouts[1]).abs().max() <= ROUNDING, layouts


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_the_thread_count_leaves_the_figure_as_it_is(name: str) -> None:
    """device.threads (one thread or two) changes only the order of the sums."""
    import torch

    exception("the protocol key", name)
    before, scores = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            scores.append(fixed_scores(algorithm_overrides(name)))
    finally:
        torch.set_num_threads(before)
    assert (scores[0] - scores[1]).abs().max() <= ROUNDING, scores


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_the_device_leaves_the_figure_as_it_is(name: str) -> None:
    """fp32 on CUDA scores the episodes the CPU scores (drawn by a CPU generator on both)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    exception("the protocol key", name)
    on = [fixed_scores(algorithm_overrides(name), device) for device in ("cpu", "cuda")]
    assert (on[0] - on[1]).abs().max() <= ROUNDING, on
