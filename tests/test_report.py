"""``fewshot report DIR`` on real sweeps: the table, report.csv, report.png, unfinished runs."""

from __future__ import annotations

import csv
import math
import re
import statistics

import pytest
from conftest import eval_result
from omegaconf import OmegaConf
from PIL import Image
from test_cli import TINY, failed, ok

from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.errors import FewshotError
from fewshot_cli.report import report, run_status, t95

T95_ONE_DOF = 12.7062  # Student t, two-sided 95%, 1 degree of freedom (two seeds)

# The learning rate jumps to infinity after step 3: the weights blow up at step 4, after the
# step-2 checkpoint (as in test_cli's NaN test).
DIVERGES_AT_4 = ["train.steps=10", "train.val_every=2",
                 "train.scheduler._target_=torch.optim.lr_scheduler.MultiStepLR",
                 "~train.scheduler.step_size", "+train.scheduler.milestones=[3]",
                 "train.scheduler.gamma=inf"]


def expected_cell(values: list[float]) -> str:
    """Two seeds' mean ± 95% CI in percent, computed here independently of fewshot.report."""
    mean = statistics.fmean(values)
    return f"{100 * mean:.2f} ± {100 * T95_ONE_DOF * statistics.stdev(values) / math.sqrt(2):.2f}"


def test_report_on_a_sweep_of_two_shots_and_two_seeds(cli, tmp_path):
    sweep = tmp_path / "my sweep, 1"  # a space and a comma: DIR is a path, not an override
    ok(cli("train", "-m", *TINY, "train.steps=6", "train.val_every=2", "train.shots=1,2",
           "seed=0,1", f"hydra.sweep.dir='{sweep}'"))
    ckpts = sorted(sweep.glob("*/best.pt"))
    assert len(ckpts) == 4
    ok(cli("eval", "-m", "ckpt=" + ",".join(f"'{c}'" for c in ckpts)))
    out = ok(cli("report", str(sweep))).stdout

    runs = {}  # folder name -> (shots, best val accuracy, test accuracy)
    for ckpt in ckpts:
        state = load_checkpoint(ckpt.parent / "last.pt")
        shots = state["config"]["train"]["shots"]
        runs[ckpt.parent.name] = (shots, state["best"]["accuracy"],
                                  eval_result(ckpt.parent, 5, shots)["accuracy"])
        assert state["step"] == 6
    assert "| train.shots | finished | steps | best val acc (%) | test best.pt (%) |" in out
    for shots in (1, 2):
        val = [v for s, v, _ in runs.values() if s == shots]
        test = [t for s, _, t in runs.values() if s == shots]
        assert f"| {shots} | 2 of 2 | 6 | {expected_cell(val)} | {expected_cell(test)} |" in out
    best = max(runs, key=lambda name: runs[name][1])
    assert f"best run: {best} (train.shots={runs[best][0]} seed=" in out
    assert "not finished" not in out
    assert (sweep / "report.md").read_text() in out

    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted(row["run"] for row in rows) == sorted(runs)
    for row in rows:
        shots, val, test = runs[row["run"]]
        assert row["status"] == "done" and row["train.shots"] == str(shots)
        assert float(row["val_accuracy"]) == pytest.approx(val)
        assert float(row["test best.pt accuracy"]) == pytest.approx(test)
        assert float(row["episodes_per_s"]) > 0

    # Two panels (accuracy against train.shots, validation curves) at 110 dpi, and the two
    # groups' curves drawn in matplotlib's first two colours.
    png = Image.open(sweep / "report.png").convert("RGB")
    assert png.size == (1056, 418)
    colours = {colour for _, colour in png.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours


def test_report_lists_unfinished_runs_and_bad_folders(cli, tmp_path):
    runs = tmp_path / "runs"
    failed(cli("train", *TINY, *DIVERGES_AT_4, f"hydra.run.dir={runs / 'diverged'}"))
    elsewhere = tmp_path / "elsewhere"
    out = ok(cli("report", str(runs), f"out={elsewhere}")).stdout
    assert "0 of 1 runs finished" in out and "best run: none has finished yet" in out
    # unfinished today; failed once train.log records the error (issue 11)
    assert re.search(r"- diverged: (unfinished: step 2 of 10|failed: .*(NaN|nan))", out), out
    row, = csv.DictReader((elsewhere / "report.csv").open())
    assert row["status"] in ("unfinished", "failed") and row["step"] == "2"
    assert Image.open(elsewhere / "report.png").size == (528, 418)  # the curves panel alone
    assert not list(runs.glob("report.*"))

    with pytest.raises(FewshotError, match="is not a folder"):
        report(OmegaConf.create({"dir": str(tmp_path / "nope"), "out": None}))
    (tmp_path / "empty").mkdir()
    assert "no runs under" in failed(cli("report", str(tmp_path / "empty")))


def test_run_status_reads_the_checkpoint_step_and_the_log():
    error = "[2026-01-01 10:00:00,000][fewshot_cli.train][ERROR] - the training loss became nan"
    assert run_status("", 500, 500) == ("done", "")
    assert run_status(error, 500, 500) == ("done", "")  # an error before a resume that finished
    assert run_status(error, 200, 500) == ("failed", "the training loss became nan")
    assert run_status("Traceback (most recent call last):\n", None, 500)[0] == "failed"
    assert run_status("[...][INFO] - step 200: val", 200, 500) == ("unfinished", "step 200 of 500")
    assert run_status("", None, 500)[0] == "unfinished"


def test_a_run_a_search_pruned_is_listed_as_pruned_at_its_step():
    from fewshot_cli.train import STOPPED_EARLY

    why = "Optuna's MedianPruner pruned trial 3 of study s"
    log = f"[2026-01-01 00:00:00,000][fewshot_cli.train][INFO] - {STOPPED_EARLY % (40, 100, why)}"
    assert run_status(log, 40, 100) == ("pruned", f"at step 40 of 100 ({why})")
    assert run_status(log, 60, 100) == ("unfinished", "step 60 of 100")  # resumed by hand since
    assert run_status(log, 100, 100) == ("done", "")


def test_t95_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy comes with the [dev] extra")
    for dof in range(1, 300):
        assert t95(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-4), dof
