"""Sweeps through Hydra's launcher and sweeper plugins (the ``cluster`` extra), real CLI runs."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import HUNG
from helpers import SMALL, assert_readable, ok, weights
from omegaconf import OmegaConf

from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.report import figure, report

SHORT = [*SMALL, "train.steps=2", "train.val_every=2"]


def plugin(name: str) -> None:
    """Skip unless the Hydra plugin ``name`` of the cluster extra is installed."""
    pytest.importorskip(f"hydra_plugins.{name}", reason=f"{name} is not installed: it comes with "
                        "the cluster extra, pip install -e '.[dev,cluster]' (.ci/run does)")


def test_joblib_runs_four_runs_two_at_a_time(cli, tmp_path):
    plugin("hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    ok(cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SHORT,
           "train.shots=1,2", "seed=0,1", f"hydra.sweep.dir={sweep}",
           env={"OMP_NUM_THREADS": ""}))  # device.threads=auto decides
    assert len(list(sweep.glob("*/best.pt"))) == 4
    for log in sweep.glob("*/train.log"):  # the two workers share the cores
        assert "2 processes at once" in log.read_text(), log.read_text()
    # TensorBoard names each event file after the process writing it: two workers wrote them.
    writers = {p.name.split(".")[-2] for p in sweep.glob("*/events.out.tfevents.*")}
    assert len(writers) == 2, writers


def test_submitit_local_runs_two_jobs_returning_their_best_accuracy(cli, tmp_path):
    plugin("hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    ok(cli("train", "-m", "hydra/launcher=submitit_local", *SHORT, "seed=0,1",
           f"hydra.sweep.dir={sweep}"))
    best = sorted(load_checkpoint(p)["best"]["accuracy"] for p in sweep.glob("*/best.pt"))
    assert len(best) == 2
    # submitit pickles each job's result: what `fewshot train` returned, for sweepers to use.
    results = [pickle.loads(p.read_bytes()) for p in sweep.glob(".submitit/*/*_result.pkl")]
    assert [status for status, _ in results] == ["success", "success"]
    assert sorted(job.return_value for _, job in results) == pytest.approx(best)


def test_optuna_sweep_of_three_trials_names_its_best(cli, tmp_path):
    pytest.importorskip("optuna", minversion="4", reason="Optuna comes with the cluster extra")
    sweep = tmp_path / "sweep"
    # train.ways and (in SMALL) train.queries on the command line are fixed for every trial;
    # Optuna searches the learning rate and the distance.
    ok(cli("train", "hparams_search=protonet_omniglot", *SMALL, "train.ways=5", "train.steps=4",
           "train.val_every=2", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"))
    trials = {int(p.parent.name): load_checkpoint(p)["best"]["accuracy"]
              for p in sweep.glob("*/last.pt")}
    assert sorted(trials) == [0, 1, 2]  # one folder per trial, named by its number
    found = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(found.best_params) == {"train.lr", "algo.distance"}
    assert found.best_value == pytest.approx(max(trials.values()))
    best = max(sorted(trials), key=trials.get)
    assert found.best_trial == best and found.best_run_dir == str(sweep / str(best))
    overrides = list(OmegaConf.load(sweep / str(best) / ".hydra" / "overrides.yaml"))
    assert {f"{k}={v}" for k, v in found.best_params.items()} <= set(overrides)
    assert f"best run: {best} (train.lr=" in ok(cli("report", str(sweep))).stdout

    # Issue 31.5: the report drew lr on a linear axis with full-precision ticks, joined trials
    # of other distances by lines and averaged them "over seeds". Now a slice per searched key
    # (lr on the log scale it is searched on), Optuna's importances, and no mean anywhere.
    found = report(OmegaConf.create({"dir": str(sweep), "out": str(tmp_path / "report")}))
    assert found["keys"] == ["train.lr", "algo.distance"]
    fig = figure(sweep, found["runs"], found["keys"], found["tests"])
    assert_readable(fig)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert list(panels) == ["slice: best val against train.lr (n=3)",
                            "slice: best val against algo.distance (n=3)",
                            "parameter importance (Optuna fANOVA, n=3)",
                            "validation curves (colour: run number)"]
    assert panels["slice: best val against train.lr (n=3)"].get_xscale() == "log"
    assert not [ax for ax in fig.axes if ax.containers and ax.get_title().startswith("slice")]
    assert not [line for ax in panels.values() for line in ax.lines
                if ax.get_title().startswith("slice")]
    assert "average nothing across them" in (tmp_path / "report" / "report.md").read_text()


def test_slurm_launcher_config_composes(fewshot):
    plugin("hydra_submitit_launcher")
    out = ok(fewshot("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg",
                 "hydra")).stdout
    launcher = OmegaConf.create(out).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.timeout_min == 240


def test_a_failed_trial_is_recorded_and_the_study_goes_on(cli, tmp_path):
    """A trial that fails prints its sentence, is told to Optuna as failed, leaves its config
    and error in its folder for fewshot report, and the other trials still run."""
    optuna = pytest.importorskip("optuna", minversion="4",
                                 reason="Optuna comes with the cluster extra")
    space = tmp_path / "conf" / "hparams_search"
    space.mkdir(parents=True)
    (space / "ways.yaml").write_text(
        "# @package _global_\ndefaults:\n  - base/optuna\n"
        "hydra:\n  sweeper:\n    n_trials: 4\n    params:\n      train.ways: choice(5, 60)\n")
    sweep, db = tmp_path / "sweep", tmp_path / "study.db"
    proc = cli("train", "hparams_search=ways", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
               *SMALL, "train.steps=2", "train.val_every=2", f"hydra.sweep.dir={sweep}",
               f"hydra.sweeper.storage=sqlite:///{db}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.ways=60 exceeds the 40 classes" in proc.stderr
    failed = [p for p in sweep.iterdir() if p.is_dir() and not (p / "last.pt").exists()]
    finished = [p for p in sweep.iterdir() if (p / "last.pt").exists()]
    assert failed and finished and len(failed) + len(finished) == 4
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_params["train.ways"] == 5
    trials = optuna.load_study(study_name="ways", storage=f"sqlite:///{db}").trials
    states = {t.number: t.state.name for t in trials}
    assert states == {int(p.name): "FAIL" for p in failed} | {
        int(p.name): "COMPLETE" for p in finished}
    out = ok(cli("report", str(sweep))).stdout
    assert out.count("failed: train.ways=60 exceeds") == len(failed)


def test_a_preempted_submitit_job_saves_requeues_and_ends_as_if_never_stopped(cli, tmp_path):
    """SIGUSR2 (what SLURM sends under submitit before a time limit or a preemption) at an
    arbitrary step: the run saves last.pt at that step, submitit requeues the job, and the
    requeued job continues the same run to the weights of a run never stopped."""
    plugin("hydra_submitit_launcher")
    args = [*SMALL, "backbone.hidden=8", "train.steps=120", "train.val_every=120"]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", "-m",
                             "hydra/launcher=submitit_local", *args, f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run = sweep / "0"
    deadline = time.time() + 120
    while not list(run.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(int((run / ".lock").read_text()), signal.SIGUSR2)  # the job's own process
    out, err = proc.communicate(timeout=HUNG)
    assert proc.returncode == 0, err
    log = (run / "train.log").read_text()
    stopped = re.search(r"preempted at step (\d+): saved .*last\.pt; submitit requeues", log)
    assert stopped and 0 < int(stopped.group(1)) < 120, log
    assert f"resuming from step {stopped.group(1)}" in log, log
    assert "unexpected error" not in log and "already holds" not in log + err
    assert load_checkpoint(run / "last.pt")["step"] == 120
    ok(cli("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    a, b = weights(run / "last.pt"), weights(tmp_path / "straight" / "last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_sentence_from_a_job_of_another_process_keeps_one_prefix():
    """A run stopped in a submitit or joblib job fails the sweep with its own sentence, which
    the sweeping process prints once: never `fewshot: error: fewshot: error:`, no --help hint."""
    from fewshot_cli.cli import condense

    held = "[2026-12-07][HYDRA] Launching 1 jobs\nfewshot: error: a run of the sweep failed: " \
           "interrupted at step 40: saved sweep/0/last.pt; continue with fewshot train " \
           "resume=sweep/0/last.pt\n"
    sentence, code = condense(held, "train", ["-m"])
    assert sentence.startswith("a run of the sweep failed: interrupted at step 40")
    assert code == 1 and "--help" not in sentence
