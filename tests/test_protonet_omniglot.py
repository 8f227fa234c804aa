"""Real learning: ProtoNet on the real Omniglot images, a few minutes of CPU per split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_data

COMMON = ["algo=protonet", "backbone=conv4", "device=cpu", "train.ways=20", "train.shots=1",
          "train.queries=5", "eval.ways=5", "eval.shots=1", "eval.queries=15",
          "train.val_episodes=100", "train.scheduler.step_size=1000"]


def train_and_test(cli, tmp_path: Path, root: Path, split: str, steps: int) -> dict:
    run = tmp_path / split
    proc = cli("train", *COMMON, "dataset=omniglot", f"dataset.root={root}",
               f"dataset.split={split}", f"train.steps={steps}", f"train.val_every={steps // 4}",
               f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 600 episodes where the floor is tight (5-way), 200 for the far-above-chance 20-way check:
    # a 20-way episode costs four times the images.
    for ways, episodes in ((5, 600), (20, 200)):
        proc = cli("eval", f"ckpt={run / 'best.pt'}", f"eval.ways={ways}",
                   f"eval.episodes={episodes}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(proc.stdout)
    return json.loads((run / "results.json").read_text())["best.pt"]


def test_minimal_split_unseen_alphabets(cli, tmp_path, omniglot_root):
    results = train_and_test(cli, tmp_path, omniglot_root, "minimal", steps=1200)
    five, twenty = results["5way-1shot"], results["20way-1shot"]
    assert five["accuracy"] - five["ci95"] >= 0.85, five
    assert twenty["accuracy"] >= 0.50, twenty  # chance is 5%


def test_vinyals_split_test_characters(cli, tmp_path, omniglot_root):
    results = train_and_test(cli, tmp_path, omniglot_root, "vinyals", steps=1200)
    five, twenty = results["5way-1shot"], results["20way-1shot"]
    assert five["accuracy"] - five["ci95"] >= 0.95, five
    assert twenty["accuracy"] >= 0.70, twenty
