"""Every paper preset: it composes as the CLI composes it, its episode shape is the one its
name says, its full config is the one it composed to before the presets became diffs over family
bases (tests/data/presets_before.json) but for the intended differences, it states only what
differs from its base, its paper figures are well-formed data, and it builds its data set and
algorithm (an Omniglot preset on the offline glyphs too), all in one test per preset. Also: the
device options, the preset files' length, `fewshot --help` and the generated preset table of
docs/results.md."""

from __future__ import annotations

import json
import re
import statistics
import sys

import pytest
import yaml
from conftest import REPO
from helpers import ADDED_KEYS, compose, plain

from fewshot_cli.build import build_algorithm, build_dataset
from fewshot_cli.config import conf_dir, group_option

EXPERIMENTS = conf_dir() / "experiment"
PRESETS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
BEFORE = json.loads((REPO / "tests" / "data" / "presets_before.json").read_text())
# The only keys whose values may differ from the snapshot: the augmentation keys removed in favour
# of augment= (issue 21, ignored on both sides), and, where a snapshot predates them, the keys
# added since: the paper data each preset gained, the duplicate-image switch of the split checks
# (issue 19), those of the transfer baselines (issue 22: train.yaml's, ProtoNet's cosine scale).
REMOVED = {"dataset.augment", "algo.distortions", "algo.distortion_prob"}
ADDED = {"paper", *ADDED_KEYS}
# The test shape a name does not spell as its last part.
NAME_SHAPES = {"protonet_omniglot_lake_minimal": "20w1s",
               "meta_baseline_miniimagenet_classifier": "5w1s"}
# Presets named for a method that is another algorithm's settings: Baseline++ is algo=baseline
# with a cosine head, Meta-Baseline a cosine ProtoNet (Chen et al. 2019, 2021); Meta-Baseline's
# first stage is Classifier-Baseline, algo=baseline.
METHOD_ALGOS = {"baselinepp": "baseline", "meta_baseline": "protonet"}
STAGE_ALGOS = {"meta_baseline_miniimagenet_classifier": "baseline"}
# Presets that train on other episodes than they test on, as their papers do: ProtoNet (Snell et
# al. 2017: 60-way on Omniglot, 30/20-way on miniImageNet; weightgen's Omniglot recipe is
# ProtoNet's) and Siamese Networks (Koch et al. 2015: pairs from 16 classes x 4 images).
TRAIN_SHAPES = {
    **{f"protonet_omniglot_{s}": (60, int(s[-2])) for s in ("5w1s", "5w5s", "20w1s", "20w5s")},
    "protonet_omniglot_lake_minimal": (60, 1),
    "protonet_miniimagenet_5w1s": (30, 1), "protonet_miniimagenet_5w5s": (20, 5),
    "weightgen_omniglot_5w1s": (60, 1), "weightgen_omniglot_20w1s": (60, 1),
    **{f"siamese_{d}_{s}": (16, 1) for d in ("omniglot", "miniimagenet")
       for s in ("5w1s", "5w5s", "20w1s", "20w5s")},
    # Reptile (Nichol et al. 2018, the authors' commands): 10 (miniImageNet 15) training shots.
    **{f"reptile_omniglot_{w}w{s}s": (w, 10) for w in (5, 20) for s in (1, 5)},
    **{f"reptile_miniimagenet_5w{s}s": (5, 15) for s in (1, 5)},
    # The transfer baselines train on labelled minibatches, not episodes: train.ways/shots are
    # unused and stay train.yaml's, one pretrained model serving every test shape.
    **{f"{m}_miniimagenet_5w5s": (5, 1) for m in ("baseline", "baselinepp", "rfs")},
}
FIGURE_KEYS = {"value", "ci95", "read", "verified"}


def name_shape(preset: str) -> str:
    return NAME_SHAPES.get(preset) or re.search(r"(\d+w\d+s|k\d+_n\d+)$", preset)[0]


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """``{"train.ways": 5, ...}`` of nested mappings."""
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}{key}."))
    return out


def assert_as_before(cfg: dict, before: dict) -> None:
    """``cfg`` equals the snapshot ``before`` leaf by leaf, the REMOVED keys aside, and the ADDED
    keys where the snapshot lacks them."""
    under = lambda key, keys: any(key == k or key.startswith(f"{k}.") for k in keys)
    then = {k: v for k, v in leaves(before).items() if not under(k, REMOVED)}
    now = {k: v for k, v in leaves(cfg).items()
           if not under(k, REMOVED) and (k in then or not under(k, ADDED))}
    assert now == then


@pytest.mark.parametrize("preset", PRESETS)
def test_preset(preset):
    cfg = plain([f"experiment={preset}"])
    data = cfg["choices"]["dataset"]
    # (a) the episode shape against the name
    shape = name_shape(preset)
    if match := re.fullmatch(r"(\d+)w(\d+)s", shape):
        ways, shots = int(match[1]), int(match[2])
        assert (cfg["eval"]["ways"], cfg["eval"]["shots"]) == (ways, shots)
        train = (cfg["train"]["ways"], cfg["train"]["shots"])
        assert train == TRAIN_SHAPES.get(preset, (ways, shots))
    else:
        arms, pulls = (int(x) for x in re.findall(r"\d+", shape))
        assert (cfg["dataset"]["arms"], cfg["dataset"]["pulls"]) == (arms, pulls)
    method = next((m for m in METHOD_ALGOS if preset.startswith(f"{m}_")), cfg["choices"]["algo"])
    assert cfg["choices"]["algo"] == STAGE_ALGOS.get(preset, METHOD_ALGOS.get(method, method))
    assert preset.startswith(f"{method}_{data.split('_')[0]}_")
    assert cfg["choices"]["experiment"] == preset
    # (b) nothing changed since the presets became diffs, but what was meant
    before = BEFORE[f"experiment={preset}"]
    assert_as_before(cfg, before)
    # (c) the preset states only what differs from its base
    own = yaml.safe_load((EXPERIMENTS / f"{preset}.yaml").read_text())
    bases = [d for d in own.pop("defaults") if isinstance(d, str)]
    assert len(bases) == 1 and bases[0].startswith("base/"), "a preset builds on one base"
    base = leaves(plain([f"experiment={bases[0]}", f"dataset={data}"]))
    restated = [k for k, v in leaves(own).items() if base.get(k, "<none>") == v]
    assert not restated, f"{preset} restates what its base gives: {restated}"
    # (d) the paper's figures as data, for the shapes the preset is tested at
    paper = cfg["paper"]
    assert isinstance(paper["cite"], str) and paper["metric"] in ("accuracy", "total_reward")
    assert shape == paper["shapes"][0], "the preset's own shape is the first it is tested at"
    for test_shape in paper["shapes"]:
        assert re.fullmatch(r"\d+w\d+s|k\d+_n\d+", test_shape)
    for figure in (paper["figures"] or {}).values():
        assert set(figure) == FIGURE_KEYS and isinstance(figure["value"], (int, float))
        assert figure["ci95"] is None or figure["ci95"] > 0
        assert figure["read"] and isinstance(figure["verified"], bool)
    assert all(isinstance(d, str) for d in paper["differences"])
    # (e) it builds its data set and algorithm before any image is decoded; an Omniglot preset
    # also on the offline glyphs, the tool's stand-in for Omniglot in the tests (its dataset
    # keys must fit both)
    for data in [[], ["dataset=glyphs"]] if "omniglot" in preset else [[]]:
        built = compose([f"experiment={preset}", *data, "device=cpu"])
        build_algorithm(built, build_dataset(built).input_spec())


def test_presets_are_short_diffs():
    lengths = [len((EXPERIMENTS / f"{p}.yaml").read_text().splitlines()) for p in PRESETS]
    assert statistics.median(lengths) <= 15, lengths
    assert set(BEFORE) == {f"experiment={p}" for p in PRESETS} | {
        f"device={d}" for d in ("auto", "cpu", "cuda")}, "a preset was added or removed"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_device_options_are_auto_with_one_key_changed(device):
    cfg = plain([f"device={device}"])
    assert_as_before(cfg, BEFORE[f"device={device}"])
    assert group_option("device", device) == cfg["device"]  # what resume= device=... loads


def test_help_lists_presets_but_not_their_bases():
    from fewshot_cli.cli import usage

    line = next(x for x in usage().splitlines() if x.strip().startswith("experiment="))
    listed = line.split("=", 1)[1].strip().split(", ")
    bases = {p.stem for p in (EXPERIMENTS / "base").glob("*.yaml")}
    assert listed == PRESETS and not bases & set(listed)
    assert not any(option.startswith("base/") for option in listed)


def test_readme_preset_table_is_the_generated_one():
    sys.path.insert(0, str(REPO / "scripts"))
    import preset_table

    page = (REPO / "docs" / "results.md").read_text()
    assert preset_table.page_block(page) == preset_table.render(), \
        "run: python scripts/preset_table.py --write"
