"""Bad input and faults through the real CLI: every case ends in one sentence on stderr that
names the key or file and the fix, a non-zero exit (zero where it is not an error), no
traceback, and leaves every file that existed before unchanged and loadable."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import HUNG, REPO, eval_result, run_cli, zero_a_quarter_of_the_images
from helpers import TINY, failed, ok, one_sentence, recorded_hparams
from omegaconf import OmegaConf

from fewshot_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from fewshot_cli.report import read_scalars


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path (the lock file aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def unchanged(folder: Path, before: dict[str, str]) -> None:
    """Every file of ``before`` is as it was (train.log may only have grown: fatal errors are
    logged there) and every checkpoint still loads."""
    after = snapshot(folder)
    for name, digest in before.items():
        if name != "train.log":
            assert after.get(name) == digest, f"{name} changed"
    for ckpt in folder.rglob("*.pt"):
        load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One small trained run (4 steps, validated at 2 and 4) that tests copy before use."""
    folder = tmp_path_factory.mktemp("trained")
    ok(run_cli(["train", *TINY, "train.steps=4", "train.val_every=2",
                f"hydra.run.dir={folder / 'run'}"], folder))
    return folder / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


# ---------------------------------------------------------------- 1. runs never share a folder


def test_two_runs_at_once_with_default_folders_keep_their_own_files(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", *TINY,
                               "train.steps=3", "train.val_every=3", f"seed={seed}"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=HUNG)
        assert proc.returncode == 0, err
    folders = sorted(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 2, folders
    seeds = set()
    for folder in folders:
        seed = OmegaConf.load(folder / ".hydra" / "config.yaml").seed
        assert load_checkpoint(folder / "last.pt")["config"]["seed"] == seed
        assert load_checkpoint(folder / "best.pt")["config"]["seed"] == seed
        assert f"seed={seed}" in OmegaConf.load(folder / ".hydra" / "overrides.yaml")
        assert len(list(folder.glob("events.out.tfevents.*"))) >= 1
        log = (folder / "train.log").read_text()
        assert log.count("run folder:") == 1 and str(folder.name) in log
        seeds.add(seed)
    assert seeds == {1, 2}


def _claim_as_a_new_process(base: str) -> str:
    from fewshot_cli.engine import run_folder

    run_folder._claimed.clear()  # a pool worker serves several claims; a CLI process one
    return run_folder.claim_new_dir(base)


def test_default_folders_are_claimed_atomically(tmp_path, monkeypatch):
    """Many processes claiming the same default name each get a folder of their own."""
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.chdir(tmp_path)
    with ProcessPoolExecutor(4) as pool:
        claimed = list(pool.map(_claim_as_a_new_process, ["outputs/day/12-00-00-glyphs"] * 8))
    assert len(set(claimed)) == 8 and all(Path(c).is_dir() for c in claimed)
    assert "outputs/day/12-00-00-glyphs-2" in claimed


def test_a_second_run_in_a_used_folder_is_refused(fewshot, run):
    before = snapshot(run)
    err = one_sentence(fewshot("train", *TINY, "train.steps=2", f"hydra.run.dir={run}"),
                       "already holds a run's checkpoints", "resume=", "hydra.run.dir")
    assert str(run) in err
    unchanged(run, before)


def test_a_run_folder_in_use_is_refused(cli, tmp_path):
    folder = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", *TINY,
                              "train.steps=100000", "train.val_every=100000",
                              f"hydra.run.dir={folder}"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not list(folder.glob("events.out.tfevents.*")) and time.time() < deadline:
            time.sleep(0.2)
        config = (folder / ".hydra" / "config.yaml").read_text()
        one_sentence(cli("train", *TINY, "seed=7", "train.steps=2", f"hydra.run.dir={folder}"),
                     "is in use by another fewshot run", f"pid {first.pid}")
        assert (folder / ".hydra" / "config.yaml").read_text() == config
    finally:
        first.kill()
        first.communicate()


# ---------------------------------------------------------------- 2. resume is honest


@pytest.mark.parametrize("override, words", [
    ("train.lr=1e20", ["resume cannot change train.lr=1e20", "train.steps"]),
    ("+algo.inner_lr=0.1", ["resume cannot change +algo.inner_lr=0.1"]),
    ("seed=3", ["resume cannot change seed=3"]),
    ("algo.batching=vmap", ["resume cannot change algo.batching=vmap", "has no algo.batching"]),
    ("hydra.run.dir=elsewhere", ["resume cannot change hydra.run.dir=elsewhere"]),
])
def test_resume_refuses_what_it_cannot_honour(fewshot, run, override, words):
    before = snapshot(run)
    one_sentence(fewshot("train", f"resume={run / 'last.pt'}", "train.steps=6", override), *words)
    unchanged(run, before)


def test_resume_records_what_it_changed_and_logs_into_the_run(cli, run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok(cli("train", f"resume={run / 'last.pt'}", "train.steps=6", "train.val_every=3",
           cwd=elsewhere))
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 6 and state["config"]["train"]["val_every"] == 3
    assert state["config"]["train"]["lr"] == 0.001
    assert "resuming from step 4" in (run / "train.log").read_text()
    assert not any(elsewhere.iterdir()), "resume wrote outside the run's folder"


def test_resume_from_an_older_checkpoint_is_refused(fewshot, run):
    shutil.copy(run / "last.pt", run / "older.pt")
    state = load_checkpoint(run / "older.pt")
    save_checkpoint(run / "older.pt", {**state, "step": 2})
    before = snapshot(run)
    one_sentence(fewshot("train", f"resume={run / 'older.pt'}"), "is at step 2", "step 4",
                 f"resume={run / 'last.pt'}")
    unchanged(run, before)


# ---------------------------------------------------------------- 3. any checkpoint anywhere


def test_a_cuda_checkpoint_evaluates_on_the_cpu(fewshot, run):
    state = load_checkpoint(run / "best.pt")
    state["config"]["device"]["type"] = "cuda"
    save_checkpoint(run / "cuda.pt", {k: v for k, v in state.items()
                                      if k not in ("format", "version")})
    out = ok(fewshot("eval", f"ckpt={run / 'cuda.pt'}")).stdout
    assert "test accuracy" in out
    ok(fewshot("eval", f"ckpt={run / 'cuda.pt'}", "device=cpu"))
    one_sentence(fewshot("eval", f"ckpt={run / 'cuda.pt'}", "+device=cpu"), "device")
    if not torch.cuda.is_available():
        one_sentence(fewshot("eval", f"ckpt={run / 'cuda.pt'}", "device=cuda"), "no CUDA GPU",
                     "device=cpu")


# ---------------------------------------------------------------- 4. checkpoints run no code


@pytest.mark.parametrize("section, node", [
    ("dataset", {"_target_": "builtins.open", "file": "VICTIM", "mode": "w"}),
    ("dataset", {"_target_": "shutil.copyfile", "src": "VICTIM", "dst": "VICTIM.copy"}),
    ("backbone", {"_target_": "torch.save", "obj": 1, "f": "VICTIM"}),
    ("train", {"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True,
                             "lr": {"_target_": "builtins.open", "file": "VICTIM", "mode": "w"}}}),
    ("dataset", {"_target_": "fewshot_cli.data.glyphs.Glyphs", "root": "${oc.decode:'x'}"}),
])
def test_a_crafted_checkpoint_is_refused_before_anything_is_built(fewshot, run, section, node):
    victim = run.parent / "victim.txt"
    victim.write_text("precious")
    state = load_checkpoint(run / "best.pt")
    text = json.dumps(node).replace("VICTIM", str(victim))
    state["config"][section] = {**state["config"][section], **json.loads(text)} \
        if section == "train" else json.loads(text)
    torch.save(state, run / "crafted.pt")
    for command in (["eval", f"ckpt={run / 'crafted.pt'}"],
                    ["train", f"resume={run / 'crafted.pt'}"]):
        one_sentence(fewshot(*command), "was refused", "only load checkpoints written by fewshot")
    assert victim.read_text() == "precious"
    assert not (run.parent / "victim.txt.copy").exists()


# ---------------------------------------------------------------- 5. one sentence each


@pytest.mark.parametrize("override, words", [
    ("train.ways=abc", ["train.ways=abc", "whole number", "train.ways=5"]),
    ("train.steps=abc", ["train.steps=abc", "whole number"]),
    ("train.steps=0", ["train.steps=0", "at least 1"]),
    ("train.lr=abc", ["train.lr=abc", "positive number"]),
    ("train.lr=-1", ["train.lr=-1", "positive number"]),
    ("eval.episodes=0", ["eval.episodes=0", "at least 1"]),
    ("train.val_episodes=0", ["train.val_episodes=0"]),
    ("train.val_every=0", ["train.val_every=0"]),
    ("train.nosuchkey=1", ["train.nosuchkey is not a key", "+train.nosuchkey"]),
    ("algo=nope", ["algo=nope is not an option", "protonet", "maml"]),
    ("+algo.nope=1", ["algo.nope is not an option of algo=protonet"]),
    ("train.ways=1,2,,", ["cannot read", "key=value"]),
    ("train.ways=500", ["train.ways=500 exceeds the 20 classes"]),
])
def test_option_mistakes(fewshot, tmp_path, override, words):
    one_sentence(fewshot("train", *TINY, override), *words)
    assert not (tmp_path / "outputs").exists(), "a failed command left an output folder"


def test_eval_needs_a_checkpoint_that_is_ours(fewshot, run, tmp_path):
    one_sentence(fewshot("eval"), "ckpt=PATH")
    empty, noise = tmp_path / "empty.pt", tmp_path / "noise.pt"
    empty.write_bytes(b"")
    noise.write_bytes(os.urandom(4096))
    one_sentence(fewshot("eval", f"ckpt={empty}"), str(empty), "empty (0 bytes)")
    one_sentence(fewshot("eval", f"ckpt={noise}"), str(noise), "not a file written by torch.save")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": OmegaConf.create({"a": 1})}, foreign)  # a class weights_only refuses
    one_sentence(fewshot("eval", f"ckpt={foreign}"), str(foreign), "never unpickles")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    one_sentence(fewshot("eval", f"ckpt={foreign}"), "not a fewshot checkpoint")
    one_sentence(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=0"), "eval.episodes=0")


def test_a_one_episode_eval_and_other_settings_keep_their_own_results(fewshot, run):
    ok(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=1"))
    ok(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=8"))
    text = (run / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert eval_result(run, 5, 1, episodes=1)["ci95"] is None
    assert eval_result(run, 5, 1, episodes=8)["ci95"] > 0


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MiB file system, to fill up for real; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the in-process test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_while_saving(cli, trained, tiny_tmpfs):
    run = Path(shutil.copytree(trained, tiny_tmpfs / "run"))
    before = snapshot(run)
    filler = tiny_tmpfs / "filler"
    free = shutil.disk_usage(tiny_tmpfs).free
    room = (run / "last.pt").stat().st_size // 2  # less than one checkpoint
    filler.write_bytes(b"\0" * max(free - room, 0))
    err = one_sentence(cli("train", f"resume={run / 'last.pt'}", "train.steps=6",
                           "train.val_every=2"), "No space left on device",
                       "the previous checkpoint there is unchanged", "free some space")
    assert "last.pt" in err or "best.pt" in err
    unchanged(run, before)
    assert not list(run.glob(".*.tmp"))
    assert "No space left on device" in (run / "train.log").read_text()


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """The same fault without a mount: the kernel's ENOSPC from /dev/full."""
    from fewshot_cli import files
    from fewshot_cli.errors import FewshotError

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": {}, "step": 1})
    before = path.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: (os.close(fd),
                                                              real(os.open("/dev/full",
                                                                           os.O_WRONLY),
                                                                   mode))[1])
    with pytest.raises(FewshotError, match="No space left on device.*unchanged"):
        save_checkpoint(path, {"config": {}, "step": 2, "big": torch.zeros(1 << 16)})
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_an_unwritable_run_folder(fewshot, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    with unwritable(folder):
        one_sentence(fewshot("train", *TINY, "train.steps=2", f"hydra.run.dir={folder}"),
                     "cannot write into the run folder", str(folder), "hydra.run.dir")
    assert not any(folder.iterdir())


def _fake_omniglot(root: Path, short: int | None = None, text_png: bool = False) -> Path:
    """A tiny release: small1 (train) and small2 (val/test) of 6 characters x 20 drawers;
    one character with ``short`` drawers, or one 'png' that is text."""
    from PIL import Image

    for name, alphabets in (("images_background_small1", ("Greek",)),
                            ("images_background_small2", ("Greek", "Tagalog"))):
        for alphabet in alphabets:
            for c in range(1, 7):
                drawers = short if short and alphabet == "Tagalog" and c == 2 else 20
                folder = root / name / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, drawers + 1):  # every image its own grey: no duplicates
                    grey = alphabets.index(alphabet) * 120 + (c - 1) * 20 + d - 1
                    Image.new("L", (12, 12), grey).save(folder / f"{c}_{d:02d}.png")
    if text_png:
        (root / "images_background_small2/Tagalog/character03/3_05.png").write_text("hello")
    return root


def test_data_mistakes_name_the_file_or_class(fewshot, tmp_path):
    omniglot = ["dataset=omniglot", "dataset.split=minimal", "dataset.download=false",
                "dataset.image_size=28", "backbone.hidden=8", "train.steps=2", "device=cpu",
                "train.queries=5", "eval.queries=5"]
    bad = _fake_omniglot(tmp_path / "text", text_png=True)
    err = one_sentence(fewshot("train", *omniglot, f"dataset.root={bad}"), "3_05.png",
                       "not an image")
    assert "BytesIO" not in err
    short = _fake_omniglot(tmp_path / "short", short=3)
    one_sentence(fewshot("train", *omniglot, f"dataset.root={short}"),
                 "images_background_small2/Tagalog/character02", "the 3 images", "eval.shots")


def test_a_nan_loss_is_logged_in_the_run_and_keeps_the_last_good_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    err = one_sentence(cli("train", *TINY, "train.steps=10", "train.val_every=2",
                           "train.log_every=1",
                           "train.scheduler._target_=torch.optim.lr_scheduler.MultiStepLR",
                           "~train.scheduler.step_size", "+train.scheduler.milestones=[3]",
                           "train.scheduler.gamma=inf", f"hydra.run.dir={run}"),
                       "NaN", "lower train.lr")
    assert err.split("error: ")[1] in (run / "train.log").read_text()
    assert load_checkpoint(run / "last.pt")["step"] == 2


# ---------------------------------------------------------------- 6. the smaller things


def test_hparams_name_the_variant_and_every_group(run):
    values = recorded_hparams(run)
    assert values["algo"] == "protonet" and values["dataset"] == "glyphs"
    assert values["algo.distance"] == "sqeuclidean" and values["backbone.hidden"] == 8
    assert values["dataset.classes.train"] == 20 and values["train.ways"] == 5
    assert "train.batch_size" not in values  # ProtoNet trains on episodes, not minibatches


def test_an_interrupted_run_has_its_hparams(fewshot, tmp_path, monkeypatch):
    """Issue 31.8: hparams were written once training ended, so a run stopped by Ctrl-C (or a
    cluster's SIGTERM) had none in TensorBoard. A real SIGINT sent from inside step 3."""
    from fewshot_cli.engine.trainer import MetaTrainer

    step = MetaTrainer.train_step

    def interrupted(self, at, *args, **kwargs):
        if at == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, at, *args, **kwargs)

    monkeypatch.setattr(MetaTrainer, "train_step", interrupted)
    run = tmp_path / "run"
    err = failed(fewshot("train", *TINY, "train.steps=50", "train.val_every=2",
                         f"hydra.run.dir={run}"))
    assert "interrupted at step 3" in err
    values = recorded_hparams(run)
    assert values["algo"] == "protonet" and values["train.steps"] == 50
    best = read_scalars(run, ("hparam/best_val_accuracy",))["hparam/best_val_accuracy"]
    assert [s for s, _ in best] == [2]  # the metric, as far as the run got


def test_on_a_terminal_validation_shows_progress_and_logs_stay_off_the_bar(tmp_path):
    """stdout (logs) and stderr (bars) on one pseudo-terminal, as in a user's shell: each log
    line starts on a line of its own instead of after the progress bar's text."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", *TINY,
                             "train.steps=4", "train.val_every=2",
                             f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=HUNG) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "validate" in screen, "validation showed no progress"
    logged = [line for line in screen.split("\n") if "step 2: val accuracy" in line]
    assert logged and logged[0].rstrip("\r").split("\r")[-1].startswith("step 2: val accuracy"), \
        logged


def test_bench_maml_dependencies_are_installed():
    text = (REPO / "pyproject.toml").read_text()
    assert "psutil" in text
    __import__("psutil")


# ---------------------------------------------------------------- 7. issue 19, the CLI half


def test_a_second_ctrl_c_says_which_checkpoints_the_run_folder_holds(tmp_path):
    """Ctrl-C twice (the second stops the run before it can save): the folder's checkpoints and
    their steps, read from the files, and the command that continues; never "nothing"."""
    from fewshot_cli.engine.run_folder import RunFolder
    from fewshot_cli.errors import Interrupted

    def stopped(run: Path, before_the_stop) -> BaseException:  # what leaves the run folder
        try:
            with RunFolder(run, None, resuming=False):
                before_the_stop()
                raise KeyboardInterrupt
        except BaseException as err:  # noqa: BLE001 (a bare KeyboardInterrupt is the failure)
            return err

    run = tmp_path / "a run"
    err = stopped(run, lambda: (save_checkpoint(run / "best.pt", {"config": {}, "step": 2}),
                                save_checkpoint(run / "last.pt", {"config": {}, "step": 4})))
    assert isinstance(err, Interrupted), repr(err)
    assert "last.pt (step 4) and best.pt (step 2)" in str(err), err
    assert f"train 'resume={run / 'last.pt'}'" in str(err) and "nothing" not in str(err)
    other = tmp_path / "other"
    err = stopped(other, lambda: (other / "events.out.tfevents.1").write_bytes(b""))  # started
    assert isinstance(err, Interrupted) and "before the first checkpoint was saved" in str(err)


def test_an_interruption_names_only_the_files_it_wrote(tmp_path, monkeypatch, capsys):
    """Outside a run folder (eval, predict, report, data decoding) the message lists what
    this process wrote in full, or says nothing was written when that is true."""
    from fewshot_cli import cli, files

    monkeypatch.setattr(files, "_written", [])

    def stopped_after(*paths: Path) -> str:
        def task() -> None:
            for path in paths:
                files.atomic_write_text("{}", path)
            raise KeyboardInterrupt
        with pytest.raises(SystemExit) as done:
            cli.guarded(task, "eval")
        assert done.value.code == 130
        return capsys.readouterr().err

    assert "interrupted; nothing was written" in stopped_after()
    err = stopped_after(tmp_path / "results.json")
    assert str(tmp_path / "results.json") in err and "nothing" not in err


def test_two_ctrl_c_while_validating_tell_the_truth(tmp_path):
    """The real command: the second Ctrl-C lands in validation (or, by timing, the first
    stops the run at a step): whatever the sentence says the folder holds, it holds."""
    import re
    import signal

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", *TINY,
                             "train.steps=100000", "train.val_every=2", "train.val_episodes=400",
                             f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HUNG)
    message = one_sentence(subprocess.CompletedProcess([], proc.returncode, "", err), code=130)
    assert "nothing was written" not in message
    claims = re.findall(r"(last|best)\.pt \(step (\d+)\)", message) or [
        ("last", re.search(r"interrupted at step (\d+): saved", message).group(1))]
    for name, step in claims:
        assert load_checkpoint(run / f"{name}.pt")["step"] == int(step), message
    assert f"resume={run / 'last.pt'}" in message


# Values Hydra's grammar would split, refuse or turn into numbers, booleans or other strings.
ODD_PATHS = ["c,d/best.pt", "a=b/x", "my runs/best.pt", "it's/x", 'say "hi"/x', "(1)/x",
             "[a]/x", "{a}/x", "a~b", "é ü 漢/x", "back\\slash/x", "end\\", "true", "1e3", " lead",
             "x#y;z!&"]


@pytest.mark.parametrize("multirun", [False, True])
def test_every_path_key_reaches_the_command_as_typed(multirun, tmp_path, monkeypatch):
    """Each path key of each command (options.PATHS) gets the path the user typed, whatever it
    holds; under -m too, where a path that exists is one path (its comma is no sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fewshot_cli.cli import quote_paths
    from fewshot_cli.options import PATHS

    monkeypatch.chdir(tmp_path)
    parser = OverridesParser.create()
    for value in ODD_PATHS:
        if multirun and "," in value:
            (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value).write_text("")
        for command, keys in PATHS.items():
            for key in keys:
                [arg] = quote_paths([f"{key}={value}"], command, multirun)
                override = parser.parse_override(arg)
                assert not override.is_sweep_override(), (key, value, arg)
                assert override.value() == value, (key, value, arg)


def test_a_sweep_over_paths_with_commas_cuts_where_paths_exist(tmp_path, monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fewshot_cli.cli import quote_paths
    from fewshot_cli.errors import FewshotError

    def swept(arg: str) -> list[str]:
        """The value each run of the sweep gets, as Hydra's sweeper hands them out."""
        [quoted] = quote_paths([arg], "eval", multirun=True)
        parser = OverridesParser.create()
        return [parser.parse_override(f"ckpt={one}").value()
                for one in parser.parse_override(quoted).sweep_string_iterator()]

    monkeypatch.chdir(tmp_path)
    for name in ("c,d/best.pt", "c,d/last.pt", "x", "x,y", "y,z", "z"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert swept("ckpt=c,d/best.pt,c,d/last.pt") == ["c,d/best.pt", "c,d/last.pt"]
    assert swept("ckpt=a.pt,b.pt") == ["a.pt", "b.pt"]  # nothing exists: Hydra's own reading
    with pytest.raises(FewshotError, match="can be read as the paths.*quote each path"):
        quote_paths(["ckpt=x,y,z"], "eval", multirun=True)  # x + y,z or x,y + z
    with pytest.raises(FewshotError, match="names 2 paths; add -m"):
        quote_paths(["ckpt=c,d/best.pt,c,d/last.pt"], "eval", multirun=False)


def test_commas_and_symbols_in_paths_through_the_real_commands(cli, run, tmp_path):
    """eval, eval -m over two such folders, resume and dataset.root, with odd folder names."""
    odd = [tmp_path / "c,d (1)=x é", tmp_path / "it's, a=b"]
    for folder in odd:
        shutil.copytree(run, folder)
    ok(cli("eval", f"ckpt={odd[0] / 'best.pt'}", "eval.episodes=2"))
    ok(cli("eval", "-m", f"ckpt={odd[0] / 'last.pt'},{odd[1] / 'last.pt'}", "eval.episodes=2"))
    for folder in odd:
        assert "last.pt" in json.loads((folder / "results.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", *(f.name for f in odd)])
    ok(cli("train", f"resume={odd[1] / 'last.pt'}", "train.steps=5"))
    assert load_checkpoint(odd[1] / "last.pt")["step"] == 5
    err = one_sentence(cli("train", "dataset=omniglot", "dataset.download=false",
                           f"dataset.root={odd[0] / 'no data'}"))
    assert str(odd[0] / "no data") in err and "cannot read" not in err


@pytest.mark.parametrize("override, words", [
    ("train.scheduler.gamma=abc", ["train.scheduler.gamma=abc", "positive number"]),
    ("train.scheduler.step_size=0", ["train.scheduler.step_size=0", "at least 1"]),
    ("train.optimizer._target_=builtins.open", ["train.optimizer._target_=builtins.open",
                                                "optimizer class of torch.optim"]),
    ("train.scheduler._target_=torch.optim.SGD", ["train.scheduler._target_", "schedule"]),
    ("train.optimizer._target_=torch.optim.lr_scheduler.StepLR", ["train.optimizer._target_"]),
    ("+train.optimizer.nesterov=true", ["train.optimizer.nesterov is not an option of Adam",
                                        "amsgrad"]),
    ("+train.scheduler.T_max=9", ["train.scheduler.T_max is not an option of StepLR"]),
    ("+train.optimizer.amsgrad=maybe", ["train.optimizer.amsgrad=maybe", "true or false"]),
    ("+train.optimizer.betas=[1.5,0.9]", ["train.optimizer=Adam", "beta", "train.optimizer"]),
    ("train.optimizer._target_=torch.optim.LBFGS", ["train.optimizer=LBFGS", "closure"]),
    ("~train.scheduler.step_size", ["train.scheduler=StepLR", "step_size"]),
])
def test_optimizer_and_schedule_mistakes_stop_before_any_image_is_read(fewshot, tmp_path, own_cache,
                                                                       override, words):
    from image_folder import make_image_folder

    data = make_image_folder(tmp_path / "data", {f"c{i}": 6 for i in range(6)})
    one_sentence(fewshot("train", "dataset=folder", f"dataset.root={data}", "dataset.image_size=28",
                     "backbone.hidden=8", "train.ways=2", "train.queries=2", "eval.queries=2",
                     "device=cpu", override), *words)
    assert not own_cache.exists() or not any(own_cache.iterdir()), "images were decoded first"
    assert not (tmp_path / "outputs").exists()


def test_command_options_and_missing_folders_are_one_sentence(fewshot, run, tmp_path):
    for batch in ("0", "-3", "abc"):
        one_sentence(fewshot("predict", f"ckpt={run / 'best.pt'}", f"support={run}",
                         f"query={run}", f"batch={batch}"), f"batch={batch}", "at least 1")
    one_sentence(fewshot("report"), "fewshot report needs dir=PATH", "multirun/<date>/<time>")
    one_sentence(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.ways=abc"), "eval.ways=abc")


def test_every_help_shows_no_missing_value(fewshot):
    from fewshot_cli.cli import COMMANDS

    for command in COMMANDS:
        out = ok(fewshot(command, "--help")).stdout
        assert "???" not in out and "== Config ==" in out, (command, out)


def _read_only(folder: Path) -> Path:
    """``folder`` mounted read-only (a tmpfs), or skip where mounting is not allowed."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    return folder


def test_a_read_only_place_is_named_before_anything_runs(cli, run, tmp_path):
    ro = _read_only(tmp_path / "ro")
    try:
        one_sentence(cli("train", *TINY, "train.steps=2", cwd=ro), "cannot make the run folder",
                     str(ro), "read-only", "hydra.run.dir=PATH")
        one_sentence(cli("train", "-m", *TINY, "train.steps=2", cwd=ro),
                     "cannot make the run folder", "hydra.sweep.dir=PATH")
        one_sentence(cli("train", *TINY, "train.steps=2", f"hydra.run.dir={ro / 'run'}"),
                     f"{ro / 'run'} (hydra.run.dir)", "read-only file system",
                     "writable disk")
        one_sentence(cli("predict", f"ckpt={run / 'best.pt'}", f"support={run}", f"query={run}",
                         cwd=ro), "out=predictions.csv cannot be written", "read-only")
        ok(cli("eval", "-m", f"ckpt={run / 'best.pt'}", "eval.episodes=2", cwd=ro))
        one_sentence(cli("report", str(ro)), f"out={ro}", "read-only")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_system_errors_get_their_own_advice():
    """Each errno is told its own fix: only a full disk is told to free space."""
    import errno

    from fewshot_cli.cli import one_sentence as sentence
    from fewshot_cli.files import write_failure

    fixes = {}
    for code in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                 errno.EEXIST, errno.EROFS, errno.EACCES, errno.ENOSPC):
        err = OSError(code, os.strerror(code), "/x/y")
        message, status = sentence(err)
        assert status == 1 and "/x/y" in message and os.strerror(code) in message
        assert ("free some space" in message) == (code == errno.ENOSPC), message
        assert str(write_failure(Path("/x/y"), err, "kept")).endswith(message.split("; ", 1)[1])
        fixes[code] = message.split("; ", 1)[1]
    assert len(set(fixes.values())) == len(fixes)
    assert "symbolic link" in fixes[errno.ELOOP] and "shorter" in fixes[errno.ENAMETOOLONG]


def test_paths_of_the_wrong_kind_say_what_they_are(fewshot, run, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    a_file = tmp_path / "a file"
    a_file.write_text("")
    cases = [
        (["eval", f"ckpt={run}"], ["is a folder, not a checkpoint", f"ckpt={run / 'best.pt'}",
                                   f"ckpt={run / 'last.pt'}"]),
        (["train", f"resume={run}"], ["is a folder", f"resume={run / 'last.pt'}"]),
        (["eval", f"ckpt={loop / 'best.pt'}"], ["ckpt=", "symbolic link", "loop"]),
        (["eval", f"ckpt={tmp_path / ('x' * 300)}.pt"], ["ckpt=", "shorter path"]),
        (["eval", f"ckpt={tmp_path / 'gone' / 'best.pt'}"], ["does not exist", "nor does"]),
        (["predict", f"ckpt={run / 'best.pt'}", f"support={a_file}", f"query={run}"],
         ["support=", "is a file, not a folder"]),
        (["predict", f"ckpt={run / 'best.pt'}", f"support={run}", f"query={tmp_path / 'no'}"],
         ["query=", "does not exist"]),
        (["predict", f"ckpt={run / 'best.pt'}", f"support={run}", f"query={run}",
          f"out={run}"], ["out=", "is a folder"]),
        (["report", str(a_file)], ["dir=", "is a file, not a folder"]),
        (["train", *TINY, f"hydra.run.dir={a_file}"], ["hydra.run.dir", "File exists",
                                                        "in the way"]),
        (["train", *TINY, f"hydra.run.dir={a_file / 'run'}"], ["hydra.run.dir", "not a folder"]),
        (["train", *TINY, f"hydra.run.dir={loop / 'run'}"], ["hydra.run.dir", "symbolic link"]),
    ]
    for args, words in cases:
        err = one_sentence(fewshot(*args), *words)
        assert "free some space" not in err and "Error:" not in err, err


def test_the_printed_next_step_works_as_printed(cli, tmp_path):
    """`fewshot train` ends with the eval command to run: pasted into a shell as printed (the
    run folder's name holds a space, a quote and a comma), it runs."""
    import shlex

    run = tmp_path / "Bob's run, 2"
    out = ok(cli("train", *TINY, "train.steps=2", "train.val_every=2", f"hydra.run.dir={run}"))
    printed = out.stdout.split("evaluate with: ")[1].splitlines()[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok(subprocess.run(shlex.split(printed), cwd=elsewhere, capture_output=True, text=True))
    assert "best.pt" in json.loads((run / "results.json").read_text())


# ---------------------------------------------------------------- 8. the data under a figure


FOLDER = ["dataset=folder", "dataset.image_size=16", "backbone.hidden=8", "train.ways=2",
          "train.queries=2", "eval.queries=2", "train.steps=2", "train.val_every=2",
          "train.val_episodes=2", "eval.episodes=4", "device=cpu"]


def test_a_damaged_cache_is_rebuilt_and_the_figure_stays(cli, tmp_path, own_cache):
    """Issue 19, case 9: a quarter of the cache zeroed is found by its checksum and rebuilt."""
    from image_folder import make_image_folder

    root = make_image_folder(tmp_path / "mine", {f"c{i}": 6 for i in range(10)})
    run = tmp_path / "run"
    ok(cli("train", *FOLDER, f"dataset.root={root}", f"hydra.run.dir={run}"))
    first = ok(cli("eval", f"ckpt={run / 'best.pt'}"))
    figure = eval_result(run, 2, 1)["accuracy"]
    (cache,) = own_cache.glob("folder-*.pt")
    zero_a_quarter_of_the_images(cache)
    again = ok(cli("eval", f"ckpt={run / 'best.pt'}", "eval.seed=2024"))
    assert "is damaged (" not in first.stdout + first.stderr
    assert f"the decoded cache {cache} is damaged" in again.stdout + again.stderr
    assert eval_result(run, 2, 1)["accuracy"] == figure
    assert "is damaged (" not in ok(cli("eval", f"ckpt={run / 'best.pt'}")).stdout  # sound again


def test_a_split_that_leaks_is_refused_before_training(fewshot, tmp_path):
    """Issue 19, case 3: train/, val/ and test/ holding the same classes, or one image file in
    a train and a test class, end in one sentence before anything is trained."""
    from image_folder import make_image_folder

    root = make_image_folder(tmp_path / "leak", {f"{s}/{c}": 5 for s in ("train", "val", "test")
                                                 for c in ("cat", "dog", "owl")})
    run = tmp_path / "run"
    one_sentence(fewshot("train", *FOLDER, f"dataset.root={root}", f"hydra.run.dir={run}"),
                 "3 class(es) are in two splits: cat (train/cat in train, val/cat in val, "
                 "test/cat in test)", "move or rename")
    assert not run.exists() or not any(run.iterdir())
    for split, suffix in (("val", "v"), ("test", "t")):
        for c in ("cat", "dog", "owl"):
            (root / split / c).rename(root / split / f"{c}_{suffix}")
    copied = root / "test" / "owl_t" / "copy.png"
    shutil.copy(root / "train" / "cat" / "001.png", copied)
    one_sentence(fewshot("train", *FOLDER, f"dataset.root={root}", f"hydra.run.dir={run}"),
                 f"{root / 'train' / 'cat' / '001.png'} (train) = {copied} (test)",
                 "dataset.allow_duplicates=true")
    assert not run.exists() or not any(run.iterdir())


def test_every_class_under_min_images_is_one_sentence(fewshot, tmp_path):
    from image_folder import make_image_folder

    root = make_image_folder(tmp_path / "few", {"a": 3, "b": 3, "c": 2})
    one_sentence(fewshot("train", *FOLDER, f"dataset.root={root}", "dataset.min_images=4"),
                 "every class in", "fewer than dataset.min_images=4 images (the largest has 3)",
                 "dataset.min_images=3")


# ---------------------------------------------------------------- 8. a result is never lost


@pytest.mark.parametrize("content", [b'{"best.pt": {"5-way', b'{"best.pt": []}'])
def test_eval_prints_its_figure_and_keeps_it_beside_a_results_file_it_cannot_merge_into(
        fewshot, run, content):
    """Issue 19.10: a corrupt results.json made eval drop its figure, [] gave a traceback."""
    (run / "results.json").write_bytes(content)
    proc = ok(fewshot("eval", f"ckpt={run / 'best.pt'}"))
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    figure = next(i for i, line in enumerate(lines) if "test accuracy" in line)
    moved = next(i for i, line in enumerate(lines) if "could not be merged into" in line)
    assert figure < moved, proc.stdout  # the figure first, whatever happens to the file
    aside, = run.glob("results.json.corrupt-*")
    assert aside.name in lines[moved] and aside.read_bytes() == content
    assert len(eval_result(run, 5, 1, episodes=8)) > 0


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` cannot be written within the block: immutable (chattr, which binds root too)
    or, where chattr is missing, read-only; skips the test where neither holds for root."""
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if not immutable:
        if os.geteuid() == 0:
            pytest.skip("chattr is not available and root ignores permission bits")
        folder.chmod(0o555)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_eval_that_cannot_write_its_result_has_printed_it_first(fewshot, run):
    with unwritable(run):
        proc = fewshot("eval", f"ckpt={run / 'best.pt'}")
    one_sentence(proc, "could not write", "results.json", "the figure above was not saved")
    assert "5-way 1-shot (3 queries) test accuracy" in proc.stdout
    assert not (run / "results.json").exists()


@pytest.mark.parametrize("content", [b"\x00garbage", b"[]", b'{"best.pt": []}'])
def test_report_names_a_run_whose_results_cannot_be_read_and_reports_the_rest(
        fewshot, trained, tmp_path, content):
    """Issue 19.10: one corrupt results.json made fewshot report fail for the whole folder."""
    sweep = tmp_path / "sweep"
    for n in ("0", "1"):
        shutil.copytree(trained, sweep / n)
    config = OmegaConf.load(sweep / "1" / ".hydra" / "config.yaml")
    config.seed = 1  # another run, not a repeat of the first
    OmegaConf.save(config, sweep / "1" / ".hydra" / "config.yaml")
    ok(fewshot("eval", f"ckpt={sweep / '1' / 'best.pt'}"))
    (sweep / "0" / "results.json").write_bytes(content)
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "config.yaml").write_bytes(content)  # a run's config, too
    proc = ok(fewshot("report", str(sweep)))
    assert "Traceback" not in proc.stderr and "2 of 2 runs finished" in proc.stdout
    note, = [line for line in proc.stdout.splitlines() if line.startswith("- 0: ")]
    assert "results.json" in note and "left out" in note, proc.stdout
    assert "- 2: its .hydra files cannot be read" in proc.stdout
    own = eval_result(sweep / "1", 5, 1)["accuracy"]
    assert "| 2 of 2 | 4 | " in proc.stdout and f"| {100 * own:.2f} (n=1) |" in proc.stdout


def test_query_statistics_a_model_cannot_switch_to_are_one_sentence(fewshot, run):
    one_sentence(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.query_statistics=sideways"),
                 "eval.query_statistics=sideways must be inductive or transductive")
    one_sentence(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.query_statistics=transductive"),
                 "eval.query_statistics=transductive", "no per-batch statistics", "drop the key")
    assert not (run / "results.json").exists()
