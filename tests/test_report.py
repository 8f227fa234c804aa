"""``fewshot report DIR`` on real sweeps: the table, report.csv, report.png, unfinished runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import statistics

import pytest
from conftest import eval_result
from helpers import SMALL, assert_readable, failed, ok
from omegaconf import OmegaConf
from PIL import Image

from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.errors import FewshotError
from fewshot_cli.report import Column, Run, figure, report, result_columns, run_status

T95_ONE_DOF = 12.7062  # Student t, two-sided 95%, 1 degree of freedom (two seeds)

# The learning rate jumps to infinity after step 3: the weights blow up at step 4, after the
# step-2 checkpoint (as in test_cli's NaN test).
DIVERGES_AT_4 = ["train.steps=10", "train.val_every=2",
                 "train.scheduler._target_=torch.optim.lr_scheduler.MultiStepLR",
                 "~train.scheduler.step_size", "+train.scheduler.milestones=[3]",
                 "train.scheduler.gamma=inf"]


def expected_cell(values: list[float]) -> str:
    """Two seeds' mean ± 95% CI in percent and their count, computed here independently of
    fewshot.report."""
    mean = statistics.fmean(values)
    ci = 100 * T95_ONE_DOF * statistics.stdev(values) / math.sqrt(2)
    return f"{100 * mean:.2f} ± {ci:.2f} (n=2)"


def test_report_on_a_sweep_of_two_shots_and_two_seeds(cli, tmp_path):
    sweep = tmp_path / "my sweep, 1"  # a space and a comma: DIR is a path, not an override
    ok(cli("train", "-m", *SMALL, "train.steps=6", "train.val_every=2", "train.shots=1,2",
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
    assert "| train.shots | finished | steps | best val accuracy (%) | test accuracy best.pt (%) " \
           "| episodes/s |" in out
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
        assert row["metric"] == "accuracy" and float(row["val_score"]) == pytest.approx(val)
        assert float(row["test best.pt score"]) == pytest.approx(test)
        assert float(row["episodes_per_s"]) > 0

    # Three panels (best val and the test against train.shots, validation curves) at 110 dpi,
    # and the two groups' curves drawn in matplotlib's first two colours.
    png = Image.open(sweep / "report.png").convert("RGB")
    assert png.size == (1848, 429)
    colours = {colour for _, colour in png.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours

    # Issue 19.5: one more eval of one run under another protocol changed that row's test
    # figure (49.87 ± 6.80 became 41.64 ± 29.52). Now the own column keeps its figures and the
    # other protocol gets a column of its own.
    extra = sorted(ckpts)[0]
    ok(cli("eval", f"ckpt='{extra}'", "eval.queries=2", "eval.episodes=3", "eval.seed=7"))
    again = ok(cli("report", str(sweep))).stdout
    shots = runs[extra.parent.name][0]
    val = [v for s, v, _ in runs.values() if s == shots]
    test = [t for s, _, t in runs.values() if s == shots]
    assert f"| {shots} | 2 of 2 | 6 | {expected_cell(val)} | {expected_cell(test)} | " in again
    other = eval_result(extra.parent, 5, shots, episodes=3)
    assert "| test accuracy best.pt (%) | test accuracy best.pt P1 (%) |" in again
    assert f"- P1: 5-way {shots}-shot (2 queries), 3 episodes, seed 7, inductive query " \
           "statistics\n" in again
    assert f" | {100 * other['accuracy']:.2f} (n=1) | " in again

    # Issue 31.5: the full protocol as a legend label pushed the panel off the canvas, and the
    # test of 1 run of 2 was drawn as the group's. Now a panel per protocol, named P1 as in
    # report.md, legends beside the axes, and a count beside every mean.
    found = report(OmegaConf.create({"dir": str(sweep), "out": str(tmp_path / "again")}))
    fig = figure(sweep, found["runs"], found["keys"], found["tests"])
    assert_readable(fig)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["best val against train.shots", "test (own protocol) against "
                            "train.shots", "test (P1) against train.shots",
                            "validation curves (dashed: not finished)"]
    counts = lambda title: sorted(t.get_text() for t in panels[title].texts)
    assert counts("best val against train.shots") == ["n=2", "n=2"]
    assert counts("test (P1) against train.shots") == ["n=1"]
    assert Image.open(tmp_path / "again" / "report.png").size == (1848, 858)  # 3 + 1 panels


def test_report_lists_unfinished_runs_and_bad_folders(fewshot, tmp_path):
    runs = tmp_path / "runs"
    failed(fewshot("train", *SMALL, *DIVERGES_AT_4, f"hydra.run.dir={runs / 'diverged'}"))
    elsewhere = tmp_path / "elsewhere"
    out = ok(fewshot("report", str(runs), f"out={elsewhere}")).stdout
    assert "0 of 1 runs finished" in out and "best run: none has finished yet" in out
    # unfinished today; failed once train.log records the error (issue 11)
    assert re.search(r"- diverged: (unfinished: step 2 of 10|failed: .*(NaN|nan))", out), out
    row, = csv.DictReader((elsewhere / "report.csv").open())
    assert row["status"] in ("unfinished", "failed") and row["step"] == "2"
    assert Image.open(elsewhere / "report.png").size == (616, 429)  # the curves panel alone
    assert not list(runs.glob("report.*"))

    with pytest.raises(FewshotError, match="is not a folder"):
        report(OmegaConf.create({"dir": str(tmp_path / "nope"), "out": None}))
    (tmp_path / "empty").mkdir()
    assert "no runs under" in failed(fewshot("report", str(tmp_path / "empty")))


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


RL2 = ["algo=rl2", "dataset=bandits", "backbone.hidden=16", "train.meta_batch=32",
       "train.val_episodes=20", "eval.episodes=40", "eval.batch=40", "device=cpu"]


def test_report_reads_each_runs_metric_and_counts_a_repeated_run_once(cli, tmp_path):
    """Issues 19.7 and 19.8: an RL² sweep showed total reward x100 under "best val acc (%)"
    without curves, and identical runs were averaged as seeds (± 0.00)."""
    sweep = tmp_path / "sweep"
    ok(cli("train", "-m", *RL2, "train.steps=4", "train.val_every=2", "seed=0,0,1",
           f"hydra.sweep.dir={sweep}"))
    best = {n: load_checkpoint(sweep / n / "last.pt")["best"] for n in ("0", "1", "2")}
    assert best["0"]["metric"] == "total_reward"
    ok(cli("eval", f"ckpt={sweep / '0' / 'best.pt'}"))
    test = eval_result(sweep / "0", 5, 1)["total_reward"]
    out = ok(cli("report", str(sweep))).stdout

    counted = [best["0"]["score"], best["2"]["score"]]  # run 1 repeats run 0: counted once
    mean = statistics.fmean(counted)
    ci = T95_ONE_DOF * statistics.stdev(counted) / math.sqrt(2)
    assert "| runs | finished | steps | best val total_reward | test total_reward best.pt | " \
           "episodes/s |" in out, out
    assert f"| all | 2 of 2 (+1 repeated) | 4 | {mean:.2f} ± {ci:.2f} (n=2) | {test:.2f} (n=1) " \
           "| " in out
    assert "- 1 repeats 0" in out
    assert not [line for line in out.splitlines() if line.startswith("|") and "%" in line]
    assert f"best val total_reward {max(counted):.2f} ±" in out

    rows = {row["run"]: row for row in csv.DictReader((sweep / "report.csv").open())}
    assert rows["0"]["metric"] == "total_reward" and rows["1"]["repeat_of"] == "0"
    assert float(rows["2"]["val_score"]) == pytest.approx(best["2"]["score"])
    # The validation curves of val/total_reward: one group, drawn in matplotlib's first colour.
    png = Image.open(sweep / "report.png").convert("RGB")
    assert (31, 119, 180) in {colour for _, colour in png.getcolors(maxcolors=1 << 20)}


def test_within_group_and_ordinary_tests_of_one_shape_never_share_a_column(fewshot, tmp_path):
    """Issue 19.5: Lake's within-alphabet test and the ordinary test of the same shape were one
    column. Entries as fewshot eval writes them, the within-group one changed by hand (glyphs
    have no groups to draw from)."""
    run = tmp_path / "run"
    ok(fewshot("train", *SMALL, "train.steps=2", "train.val_every=2", f"hydra.run.dir={run}"))
    ok(fewshot("eval", f"ckpt={run / 'best.pt'}"))
    results = json.loads((run / "results.json").read_text())
    (key, plain), = results["best.pt"].items()
    within = json.loads(json.dumps(plain))
    within["protocol"].update(within_group=True, distinct_drawers=True)
    within["accuracy"] = 0.123
    lake = key.replace("(5 queries)", "(5 queries), within group, distinct drawers")
    results["best.pt"][lake] = within
    # An entry written before protocol records (key and settings only) is read as the run's
    # own protocol when its settings are the run's.
    legacy = {k: v for k, v in plain.items() if k not in ("protocol", "query_statistics",
                                                          "model_query_statistics")}
    results["last.pt"] = {"5-way 1-shot (5 queries), 20 episodes, seed 2024":
                          {**legacy, "accuracy": 0.456}}
    (run / "results.json").write_text(json.dumps(results))
    out = ok(fewshot("report", str(tmp_path))).stdout
    assert "test accuracy best.pt (%) | test accuracy last.pt (%) | test accuracy best.pt " \
           "P1 (%) |" in out, out
    assert f"- P1: {lake}\n" in out
    assert f"| {100 * plain['accuracy']:.2f} (n=1) | 45.60 (n=1) | 12.30 (n=1) |" in out


def test_protocols_that_read_alike_get_their_differences_in_the_label(tmp_path):
    record = {"dataset": "glyphs", "dataset_options": {"image_size": 28}, "episodes": 3}
    columns = [Column(False, "best.pt", json.dumps(r), "5-way 1-shot, 3 episodes")
               for r in (record, {**record, "dataset_options": {"image_size": 32}})]
    runs = [Run(tmp_path / str(i), {}, tests={c: {"score": 0.5, "ci95": None}})
            for i, c in enumerate(columns)]
    labels = sorted(c.label() for c in result_columns(runs))
    assert labels == ["best.pt 5-way 1-shot, 3 episodes [dataset_options.image_size=28]",
                      "best.pt 5-way 1-shot, 3 episodes [dataset_options.image_size=32]"]
    assert [c.label() for r in runs for c in r.tests] == labels


@pytest.mark.parametrize("lrs", [
    (0.0006824078427098838, 0.0007447144904083078, 0.0012520653814999472),  # overlapped
    (3e-6, 1e-4, 2.5e-3, 0.05, 0.09, 1.2e-5, 7e-4, 0.02)])
def test_a_search_figure_reads_at_any_spread_of_values(tmp_path, lrs):
    """Issue 31.5: a 3-trial search's learning rates became three full-precision tick labels
    on each other. Runs as read_run makes them, lr searched on a log scale; every run scored
    the same, where Optuna cannot rank the keys: the panel says so instead."""
    runs = [Run(tmp_path / str(i), {"train.lr": repr(lr), "algo.distance": ("cosine", "l2")[i % 2]},
                step=4, steps=4, best={"score": 0.5, "ci95": 0.1, "step": 4},
                curve=[(2, 0.4), (4, 0.5)], config=str(i), log_keys={"train.lr"})
           for i, lr in enumerate(lrs)]
    for keys in (["train.lr"], ["train.lr", "algo.distance"]):
        fig = figure(tmp_path, runs, keys, [])
        assert_readable(fig)
        assert fig.axes[0].get_xscale() == "log"
    if importlib.util.find_spec("optuna"):
        why, = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert why.startswith("Optuna found no importances")
