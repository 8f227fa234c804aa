"""The real CLI end to end in temporary folders: train, eval, sweeps, resume, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import HUNG, eval_result
from helpers import SMALL, failed, ok, weights

from fewshot_cli.engine.checkpoint import load_checkpoint


def test_help_lists_commands_and_groups(fewshot):
    out = ok(fewshot("--help")).stdout
    for word in ("train", "eval", "algo=", "backbone=", "dataset=", "device=", "protonet",
                 "conv4", "glyphs", "omniglot", "auto"):
        assert word in out


def test_unknown_command_and_option_fail_clearly(fewshot):
    assert "unknown command 'fly'" in failed(fewshot("fly"))
    assert "nope" in failed(fewshot("train", "algo=nope"))
    assert "nosuchkey" in failed(fewshot("train", "train.nosuchkey=1"))


def test_train_then_eval_from_another_folder(cli, tmp_path):
    run = tmp_path / "run"
    ok(cli("train", *SMALL, "train.steps=20", "train.val_every=10", f"hydra.run.dir={run}"))
    for name in ("best.pt", "last.pt", "train.log"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert not list(run.glob(".*.tmp")), "a temporary checkpoint was left behind"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = ok(cli("eval", f"ckpt={run / 'best.pt'}", cwd=elsewhere)).stdout
    assert "5-way 1-shot (5 queries) test accuracy" in out and "±" in out
    result = eval_result(run, 5, 1)
    assert result["episodes"] == 20 and 0.0 <= result["accuracy"] <= 1.0 and result["ci95"] > 0
    # Other shapes are added to the same results.json, and the stored run is not changed.
    ok(cli("eval", f"ckpt={run / 'best.pt'}", "eval.ways=3", "eval.shots=2", cwd=elsewhere))
    assert eval_result(run, 3, 2)["episodes"] == 20 and eval_result(run, 5, 1)["ways"] == 5


def test_eval_is_deterministic_and_multirun_evaluates_several(cli, tmp_path):
    run = tmp_path / "run"
    ok(cli("train", *SMALL, "train.steps=4", "train.val_every=2", f"hydra.run.dir={run}"))
    first = ok(cli("eval", f"ckpt={run / 'best.pt'}")).stdout.splitlines()[0]
    second = ok(cli("eval", f"ckpt={run / 'best.pt'}")).stdout.splitlines()[0]
    assert first == second
    ok(cli("eval", "-m", f"ckpt={run / 'best.pt'},{run / 'last.pt'}"))
    assert set(json.loads((run / "results.json").read_text())) == {"best.pt", "last.pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "eval -m left folders behind"


def test_multirun_sweeps_every_combination(cli, tmp_path):
    ok(cli("train", "-m", *SMALL, "train.steps=2", "train.val_every=2", "train.shots=1,2",
           "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"))
    assert len(list((tmp_path / "sweep").glob("*/best.pt"))) == 4


def test_resume_continues_to_the_same_weights(cli, tmp_path):
    args = [*SMALL, "train.val_every=5", "train.scheduler.step_size=7"]
    ok(cli("train", *args, "train.steps=20", f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(cli("train", *args, "train.steps=10", f"hydra.run.dir={tmp_path / 'split'}"))
    ok(cli("train", f"resume={tmp_path / 'split' / 'last.pt'}", "train.steps=20"))
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 20


def stop_training(args: list[str], run: Path, sig: int) -> str:
    """Start ``fewshot train``, send ``sig`` once it trains; its stderr (it must exit 130)."""
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", *args,
                             f"hydra.run.dir={run}"], cwd=run.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(run.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HUNG)
    assert proc.returncode == 130, err
    return err


def test_ctrl_c_saves_last_and_resume_matches(cli, tmp_path):
    args = [*SMALL, "backbone.hidden=8", "train.steps=300", "train.val_every=300"]
    run = tmp_path / "run"
    err = stop_training(args, run, signal.SIGINT)
    assert "interrupted at step" in err and "resume=" in err
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 0 < stopped < 300
    ok(cli("train", f"resume={run / 'last.pt'}"))
    ok(cli("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    a, b = weights(run / "last.pt"), weights(tmp_path / "straight" / "last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_impossible_episode_shapes(fewshot):
    err = failed(fewshot("train", *SMALL, "train.ways=500"))
    assert "train.ways=500 exceeds the 40 classes" in err
    err = failed(fewshot("train", *SMALL, "train.shots=10", "train.queries=15"))
    assert "exceeds the 20 images per class" in err


def test_missing_and_foreign_checkpoints(fewshot, tmp_path):
    assert "does not exist" in failed(fewshot("eval", f"ckpt={tmp_path / 'nope.pt'}"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert "not a fewshot checkpoint" in failed(fewshot("eval", f"ckpt={foreign}"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    assert "not a fewshot checkpoint" in failed(fewshot("eval", f"ckpt={garbage}"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    # The learning rate jumps to infinity after step 3: the weights blow up at step 4.
    err = failed(cli("train", *SMALL, "train.steps=10", "train.val_every=2",
                     "train.scheduler._target_=torch.optim.lr_scheduler.MultiStepLR",
                     "~train.scheduler.step_size", "+train.scheduler.milestones=[3]",
                     "train.scheduler.gamma=inf", f"hydra.run.dir={run}"))
    assert "NaN" in err or "nan" in err
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(w).all() for w in state["model"].values() if w.is_floating_point())
    assert not list(run.glob(".*.tmp"))


def test_missing_omniglot_offline_names_both_fixes(fewshot, tmp_path):
    err = failed(fewshot("train", "dataset=omniglot", f"dataset.root={tmp_path / 'none'}",
                     "dataset.download=false", "train.steps=1"))
    assert "dataset.root=" in err and "dataset=glyphs" in err


def test_cuda_without_gpu_is_a_clear_error(fewshot):
    if torch.cuda.is_available():
        return
    assert "no CUDA GPU" in failed(fewshot("train", *SMALL, "device=cuda", "train.steps=1"))


def test_installed_wheel_finds_its_config_from_any_folder(tmp_path):
    """A non-editable install carries conf/ inside the package."""
    from conftest import REPO

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    ok(subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                       str(REPO)], capture_output=True, text=True))
    wheel = next(wheels.glob("fewshot-*.whl"))
    ok(subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                       str(site), str(wheel)], capture_output=True, text=True))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fewshot_cli.cli as c; "
            "print(c.conf_dir()); sys.argv = ['fewshot', 'train', '--cfg', 'job']; c.main()")
    proc = ok(subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path,
                             capture_output=True, text=True))
    assert proc.stdout.splitlines()[0].startswith(str(site))
    assert "ProtoNet" in proc.stdout and "ways: 5" in proc.stdout


def test_sigterm_saves_last_like_ctrl_c(tmp_path):
    """A cluster's time limit (SIGTERM) stops at a step boundary and saves last.pt."""
    run = tmp_path / "run"
    err = stop_training([*SMALL, "backbone.hidden=8", "train.steps=300", "train.val_every=300"],
                        run, signal.SIGTERM)
    assert "interrupted at step" in err
    assert 0 < load_checkpoint(run / "last.pt")["step"] < 300
