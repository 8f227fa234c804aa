"""Real learning, Lake et al.'s protocol: experiment=protonet_omniglot_lake_minimal, shortened
for CI (trained on images_background_small1 only), tested 20-way one-shot within alphabets with
support and query by different drawers on the evaluation alphabets, the ordinary way, and with
fewshot predict on folders of real evaluation images, scored from predictions.csv."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
from conftest import eval_result

pytestmark = pytest.mark.real_data
# fewshot predict runs: every other evaluation alphabet in name order. Alphabets differ a lot
# in difficulty (45% to 87% in the first four), so ten keep the interval usable.
ALPHABETS = slice(0, 20, 2)
T95_9 = 2.262  # Student t, 97.5% quantile, 9 degrees of freedom


def predict_alphabet(cli, ckpt: Path, alphabet: Path, folder: Path) -> float:
    """fewshot predict on one alphabet: 20 characters, the support image of each by drawer 01,
    the queries by drawers 11-20; the accuracy of predictions.csv."""
    characters = sorted(p for p in alphabet.iterdir() if p.is_dir())[:20]
    for character in characters:
        (folder / "support" / character.name).mkdir(parents=True)
        (folder / "query").mkdir(exist_ok=True)
        for image in sorted(character.glob("*.png")):
            drawer = int(image.stem.split("_")[1])
            if drawer == 1:
                shutil.copy(image, folder / "support" / character.name / image.name)
            elif drawer > 10:
                shutil.copy(image, folder / "query" / f"{character.name}__{image.name}")
    out = folder / "predictions.csv"
    proc = cli("predict", f"ckpt={ckpt}", f"support={folder / 'support'}",
               f"query={folder / 'query'}", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 * 10
    return sum(Path(r["file"]).name.split("__")[0] == r["predicted"] for r in rows) / len(rows)


def test_lake_minimal_preset_learns_far_above_chance(cli, tmp_path, omniglot_root):
    run = tmp_path / "run"
    proc = cli("train", "experiment=protonet_omniglot_lake_minimal", "device=cpu",
               f"dataset.root={omniglot_root}", "train.steps=200", "train.val_every=200",
               "train.val_episodes=50", "train.scheduler.step_size=100", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    within = cli("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=100")
    assert within.returncode == 0, within.stderr[-3000:]
    assert "20-way 1-shot (1 queries), within group, distinct drawers test accuracy" in \
        within.stdout
    ordinary = cli("eval", f"ckpt={run / 'best.pt'}", "eval.within_group=false",
                   "eval.distinct_drawers=false", "eval.queries=5", "eval.episodes=100")
    assert ordinary.returncode == 0, ordinary.stderr[-3000:]
    lake = eval_result(run, 20, 1, within_group=True)
    plain = eval_result(run, 20, 1, within_group=False)
    assert lake["within_group"] and lake["distinct_drawers"] and not plain["within_group"]
    assert lake["accuracy"] >= 0.40, lake  # chance is 5%
    assert plain["accuracy"] >= 0.50, plain

    # fewshot predict on the user's side of the same protocol: one alphabet per run, support by
    # one drawer, queries by others. Its accuracy over alphabets agrees with fewshot eval's
    # within-alphabet figure: the two 95% intervals overlap.
    alphabets = sorted(p for p in (omniglot_root / "images_evaluation").iterdir() if p.is_dir())
    accuracies = [predict_alphabet(cli, run / "best.pt", a, tmp_path / a.name)
                  for a in alphabets[ALPHABETS]]
    mean = sum(accuracies) / len(accuracies)
    sd = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1))
    assert len(accuracies) == 10
    half = T95_9 * sd / math.sqrt(len(accuracies))
    print(f"within-alphabet eval {lake['accuracy']:.4f} ± {lake['ci95']:.4f}; fewshot predict "
          f"{mean:.4f} ± {half:.4f} over {[round(a, 3) for a in accuracies]}; "
          f"ordinary 20-way {plain['accuracy']:.4f} ± {plain['ci95']:.4f}")
    assert mean >= 0.40, accuracies  # chance is 5%
    assert abs(mean - lake["accuracy"]) <= half + lake["ci95"], (accuracies, lake)
