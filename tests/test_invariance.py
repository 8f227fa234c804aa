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

import pytest

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

# ================================================================ how the work is split
# (section: how the work is split)

# ================================================================ how the pixels are stored
# (section: how the pixels are stored)

# ================================================================ copies
# (section: copies)

# ================================================================ resume
# (section: resume)

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
def test_the_device_leaves_the_figure_as_it_is(name: str) -> None:
    """fp32 on CUDA scores the episodes the CPU scores (drawn by a CPU generator on both)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    exception("the protocol key", name)
    on = [fixed_scores(algorithm_overrides(name), device) for device in ("cpu", "cuda")]
    assert (on[0] - on[1]).abs().max() <= ROUNDING, on
