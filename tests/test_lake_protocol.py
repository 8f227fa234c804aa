"""Real learning, Lake et al.'s protocol: experiment=protonet_omniglot_lake_minimal, shortened
for CI (trained on images_background_small1 only), tested 20-way one-shot within alphabets with
support and query by different drawers on the evaluation alphabets, and the ordinary way."""

from __future__ import annotations

import pytest
from conftest import eval_result

pytestmark = pytest.mark.real_data


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
    print(within.stdout, ordinary.stdout)
    lake = eval_result(run, 20, 1, within_group=True)
    plain = eval_result(run, 20, 1, within_group=False)
    assert lake["within_group"] and lake["distinct_drawers"] and not plain["within_group"]
    assert lake["accuracy"] >= 0.40, lake  # chance is 5%
    assert plain["accuracy"] >= 0.50, plain
