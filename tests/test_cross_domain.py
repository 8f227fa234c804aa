"""Cross-domain tests (issue 22.2): ``fewshot eval ckpt=... dataset=<another>`` tests a model on
another data set's test split, its images at the model's size and channels, under a results
key of their own; Chen et al. 2019's miniImageNet -> CUB on generated fakes, glyphs -> Omniglot
on the real data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from helpers import ok, one_sentence
from hydra import compose, initialize_config_dir
from image_folder import make_image_folder
from PIL import Image

from fewshot_cli.config import conf_dir
from fewshot_cli.data.cross_domain import as_model_input, luminance
from fewshot_cli.data.cub import CUB
from fewshot_cli.data.glyphs import Glyphs
from fewshot_cli.data.store import ClassStore
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.errors import FewshotError
from fewshot_cli.evaluate import other_dataset, run_config
from fewshot_cli.results import recorded_test_classes

GLYPHS = ["dataset=glyphs", "dataset.classes.train=20", "dataset.classes.val=8",
          "dataset.classes.test=8", "backbone.hidden=8", "train.queries=3", "eval.queries=3",
          "train.val_episodes=4", "eval.episodes=8", "device=cpu", "train.steps=2",
          "train.val_every=2"]
# 20 species: Chen et al.'s rule (index % 4 == 3) puts 5 of them in the test split
SPECIES = [f"{i + 1:03d}.Species_{i + 1}" for i in range(20)]



def entries(run: Path) -> dict[str, dict]:
    return json.loads((run / "results.json").read_text())["best.pt"]


@pytest.fixture(scope="module")
def glyphs_run(tmp_path_factory) -> Path:
    """A ProtoNet trained two steps on glyphs: 1-channel 28 px images."""
    folder = tmp_path_factory.mktemp("glyphs")
    ok(run_cli(["train", *GLYPHS, f"hydra.run.dir={folder / 'run'}"], folder))
    return folder / "run"


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    """A fake CUB-200-2011, extracted: 20 species of 4 colour photos (5 test species)."""
    root = tmp_path_factory.mktemp("cub")
    make_image_folder(root / "CUB_200_2011" / "images", {s: 4 for s in SPECIES}, seed=3)
    return root


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory) -> Path:
    """A ProtoNet trained two steps on a fake miniImageNet (folders layout, colour, 16 px)."""
    folder = tmp_path_factory.mktemp("mini")
    root = folder / "miniimagenet"
    for s, split in enumerate(("train", "val", "test")):
        make_image_folder(root / split, {f"n{s + 1:02d}{c:06d}": 6 for c in range(4)},
                          seed=10 + s)
    ok(run_cli(["train", "dataset=miniimagenet", f"dataset.root={root}",
                "dataset.image_size=16", "backbone.hidden=8", "train.ways=3", "train.queries=2",
                "eval.queries=2", "train.val_episodes=4", "eval.episodes=8", "device=cpu",
                "train.steps=2", "train.val_every=2", f"hydra.run.dir={folder / 'run'}"],
               folder))
    return folder / "run"


def cross_domain_store(run: Path, *overrides: str) -> ClassStore:
    """The test split of ``fewshot eval ckpt=<run>/best.pt <overrides>`` as the model reads it."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("eval", [f"ckpt={run / 'best.pt'}", *overrides])
    state = load_checkpoint(run / "best.pt")
    return other_dataset(run_config(state["config"], cfg), state).load("test")


# ---------------------------------------------------------------- channels and size


def test_grey_is_pils_luminance_and_rgb_repeats_the_grey():
    rgb = torch.randint(0, 256, (2, 3, 3, 9, 7), dtype=torch.uint8)
    pil = np.stack([np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L"))
                    for img in rgb.flatten(0, 1)])
    assert torch.equal(luminance(rgb).flatten(0, 2), torch.from_numpy(pil))
    grey = ClassStore(rgb[:, :, :1].contiguous(), ["a", "b"])
    as_rgb = as_model_input(grey, 3, 7).images
    assert as_rgb.shape == (2, 3, 3, 7, 7) and torch.equal(as_rgb[:, :, 2], as_rgb[:, :, 0])
    assert as_model_input(grey, 1, 9) is not grey  # a reader without image_size: resized here
    assert as_model_input(grey, 1, 9).images.shape == (2, 3, 1, 9, 9)


def test_a_grey_model_reads_cub_photos_by_luminance_at_its_size(glyphs_run, cub_root):
    store = cross_domain_store(glyphs_run, "dataset=cub", f"dataset.root={cub_root}",
                               "dataset.download=false")
    photos = CUB(str(cub_root), image_size=28, download=False).load("test")
    assert store.names == photos.names == SPECIES[3::4]
    assert store.images.shape == (5, 4, 1, 28, 28)
    assert torch.equal(store.images, luminance(photos.images))


def test_a_colour_model_reads_glyphs_as_three_equal_channels(mini_run):
    store = cross_domain_store(mini_run, "dataset=glyphs", "dataset.classes.test=6")
    drawn = Glyphs(classes={"train": 400, "val": 100, "test": 6}, image_size=16).load("test")
    assert store.images.shape == (6, 20, 3, 16, 16)
    assert torch.equal(store.images, drawn.images.expand(-1, -1, 3, -1, -1))


# ---------------------------------------------------------------- fewshot eval and report


def test_eval_without_dataset_tests_the_checkpoints_own_data(cli, glyphs_run):
    ok(cli("eval", f"ckpt={glyphs_run / 'best.pt'}"))
    (key, entry), = entries(glyphs_run).items()
    assert "cross-domain" not in key and "trained_on" not in entry
    assert entry["protocol"]["dataset"] == "glyphs"
    assert entry["protocol"]["dataset_options"]["classes"]["test"] == 8
    assert entry["protocol"]["test_classes"] == recorded_test_classes(glyphs_run)


def test_chens_miniimagenet_to_cub_on_fakes(cli, mini_run, cub_root):
    out = ok(cli("eval", f"ckpt={mini_run / 'best.pt'}", "dataset=cub",
                 f"dataset.root={cub_root}", "dataset.download=false")).stdout
    assert "3-way 1-shot (2 queries) cub test (cross-domain: trained on miniimagenet)" in out
    (key, entry), = entries(mini_run).items()
    assert key.startswith("cub test (cross-domain, classes ") and entry["trained_on"] == \
        "miniimagenet"
    assert entry["dataset"] == "cub" and entry["protocol"]["dataset"] == "cub"
    assert entry["protocol"]["dataset_options"]["image_size"] == 16  # the model's input size
    assert entry["protocol"]["test_classes"] != recorded_test_classes(mini_run)


def test_a_cross_domain_figure_keeps_its_own_key_and_report_column(cli, glyphs_run, cub_root,
                                                                   tmp_path):
    """The run's split record names other classes: the split check is skipped on purpose, and
    the in-domain entry stays beside the cross-domain one."""
    run = Path(shutil.copytree(glyphs_run, tmp_path / "run"))
    ok(cli("eval", f"ckpt={run / 'best.pt'}"))
    ok(cli("eval", f"ckpt={run / 'best.pt'}", "dataset=cub", f"dataset.root={cub_root}",
           "dataset.download=false"))
    keys = sorted(entries(run))
    assert len(keys) == 2 and keys[0].startswith("5-way") and keys[1].startswith("cub test (")
    cross = entries(run)[keys[1]]
    assert cross["trained_on"] == "glyphs" and cross["protocol"]["dataset"] == "cub"
    ok(cli("report", str(run)))
    head = next(csv.reader((run / "report.csv").open()))
    assert "test best.pt score" in head
    assert f"test best.pt {keys[1]} score" in head


# ---------------------------------------------------------------- mistakes


@pytest.mark.parametrize("overrides, words", [
    (["dataset=bandits"], ["dataset=bandits holds multi-armed bandit tasks", "classifies images",
                           "dataset=cub"]),
    (["dataset=nosuch"], ["dataset=nosuch is not an option", "omniglot"]),
    (["dataset=glyphs", "+dataset.colour=1"], ["dataset.colour is not an option of "
                                               "dataset=glyphs"]),
    (["dataset=glyphs", "dataset.classes.test=3"], ["dataset=glyphs's test split holds 3 "
                                                    "classes, fewer than eval.ways=5",
                                                    "lower eval.ways to at most 3"]),
])
def test_mistakes_are_one_sentence(cli, glyphs_run, overrides, words):
    one_sentence(cli("eval", f"ckpt={glyphs_run / 'best.pt'}", *overrides), *words)


def test_a_bandit_model_is_not_tested_across_domains():
    state = {"config": {"algo": {"_target_": "fewshot_cli.algorithms.rl2.RL2"},
                        "dataset": {"_target_": "fewshot_cli.data.bandits.Bandits"},
                        "choices": {"dataset": "bandits"}, "eval": {}}}
    run = run_config(state["config"], compose_eval("dataset=glyphs"))
    with pytest.raises(FewshotError, match=r"^dataset=glyphs: cross-domain tests are for "
                                           r"few-shot image classifiers, .* solves multi-armed "
                                           r"bandit tasks; evaluate it without dataset=$"):
        other_dataset(run, state)


def compose_eval(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("eval", ["ckpt=x.pt", *overrides])


# ---------------------------------------------------------------- real data


@pytest.mark.real_data
def test_a_glyphs_model_tested_on_real_omniglot(cli, omniglot_root, tmp_path):
    """ProtoNet trained on generated glyphs only, tested on Omniglot's (Vinyals) test split:
    a cross-domain figure under its own key, far above the 20% of chance."""
    run = tmp_path / "run"
    ok(cli("train", "dataset=glyphs", "backbone.hidden=32", "train.steps=100",
           "train.val_every=100", "train.val_episodes=20", "device=cpu",
           f"hydra.run.dir={run}"))
    out = ok(cli("eval", f"ckpt={run / 'best.pt'}", "dataset=omniglot",
                 f"dataset.root={omniglot_root}", "dataset.download=false",
                 "eval.episodes=100")).stdout
    assert "omniglot test (cross-domain: trained on glyphs)" in out
    (key, entry), = entries(run).items()
    assert key.startswith("omniglot test (cross-domain, classes ")
    assert entry["protocol"]["dataset"] == "omniglot" and entry["episodes"] == 100
    assert entry["accuracy"] > 0.45, entry  # 5-way 1-shot: chance is 0.2
