"""Shared fixtures: the real Omniglot location, and running the real CLI in a temp folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# pytest-xdist runs the suite on every core (``-n auto`` in pyproject.toml); each worker and the
# CLI processes it starts then get their share of the cores instead of all of them fighting
# over every core: two 1-thread trainings did 1.4x the work of one 2-thread training here.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-data tests marked ``slow`` too, and run first (the long learning tests among
    them), so the short ones fill in around them.

    They go in reverse file order: the ProtoNet ones, collected last, take longest. With
    ``--maxschedchunk=1`` xdist then hands them out two per worker, the rest one at a time.
    """
    for item in items:  # the real-data tests are the slow ones: `pytest -m "not slow"` skips them
        if item.get_closest_marker("real_data") or "omniglot_root" in getattr(
                item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    real = [item for item in items if item.get_closest_marker("slow")]
    rest = [item for item in items if not item.get_closest_marker("slow")]
    items[:] = real[::-1] + rest


# ---------------------------------------------------------------- progress from the start

# how often the session says what runs (seconds; $PYTEST_HEARTBEAT_S, 0 for never)
HEARTBEAT_S = float(os.environ.get("PYTEST_HEARTBEAT_S", 60))


def heartbeat_line(elapsed: float, done: int, total: int | None,
                   running: dict[str, float], now: float) -> str:
    """``[pytest 3 min] 40 of 812 tests done; running: tests/test_x.py::test_y (2 min), ...``:
    what the suite is doing, for the minutes in which the long real-data tests print
    nothing."""
    longest = sorted(running.items(), key=lambda kv: kv[1])[:4]
    names = ", ".join(f"{nodeid} ({(now - start) / 60:.0f} min)" for nodeid, start in longest)
    of = f" of {total}" if total else ""
    return f"[pytest {elapsed / 60:.0f} min] {done}{of} tests done; running: {names or 'none'}"


class Heartbeat:
    """On the controlling process (with or without xdist): every ``HEARTBEAT_S`` seconds one
    line naming the tests that run and since when, so the first minutes are not silent."""

    def __init__(self, config: pytest.Config) -> None:
        import threading
        import time

        self.config, self.clock = config, time.monotonic
        self.start, self.done, self.total = self.clock(), 0, None
        self.running: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        plugins = self.config.pluginmanager
        while not self.stop.wait(HEARTBEAT_S):
            reporter, capture = plugins.get_plugin("terminalreporter"), \
                plugins.get_plugin("capturemanager")
            if reporter is None or not self.running:
                continue
            now = self.clock()
            line = heartbeat_line(now - self.start, self.done, self.total, dict(self.running),
                                  now)
            # past the capture of a test running in this process (without xdist)
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(line)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.total = len(session.items) or None

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: absent with -p no:xdist
    def pytest_xdist_node_collection_finished(self, node: object, ids: list[str]) -> None:
        self.total = len(ids)

    def pytest_sessionfinish(self) -> None:
        self.stop.set()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.running[nodeid] = self.clock()

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        if self.running.pop(nodeid, None) is not None:
            self.done += 1


def pytest_configure(config: pytest.Config) -> None:
    """The heartbeat, on the controller only (an xdist worker reports to it)."""
    if HEARTBEAT_S > 0 and not hasattr(config, "workerinput") and \
            not config.getoption("collectonly"):
        beat = Heartbeat(config)
        config.pluginmanager.register(beat, "fewshot-heartbeat")
        beat.thread.start()


def omniglot_dir() -> Path | None:
    """``$FEWSHOT_DATA/omniglot`` when it holds the real release, else None."""
    base = os.environ.get("FEWSHOT_DATA")
    if not base:
        return None
    root = Path(base) / "omniglot"
    return root if (root / "images_background_small1.zip").exists() else None


@pytest.fixture
def omniglot_root() -> Path:
    root = omniglot_dir()
    if root is None:
        pytest.skip("real Omniglot not found: set FEWSHOT_DATA to a folder holding omniglot/ "
                    "(.ci/run points it at ../shared/data)")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Decoded caches of the tests go to one session-wide temporary folder, never beside the
    user's data in $FEWSHOT_DATA (FEWSHOT_CACHE, see fewshot_cli.data.store.cache_file)."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("FEWSHOT_CACHE", str(cache / "stores"))


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test alone, for tests that look at the cache files."""
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def zero_a_quarter_of_the_images(path: Path) -> None:
    """Overwrite a quarter of the image bytes of a saved store in place (a disk error): the
    largest member of torch's zip file is the image tensor."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)  # the local header's name and extra field lengths
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(member.header_offset + 30 + name_len + extra_len)
        f.write(bytes(member.file_size // 4))


# Only a process that hangs takes this long: the tests bound their work (steps, episodes), not
# their time, so that a loaded machine never trips a limit (issue 31: a 600 s limit failed a
# real-data test at 66 minutes).
HUNG = 4 * 3600


def run_cli(args: list[str], cwd: Path, timeout: float | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``fewshot <args>`` as a user would, from ``cwd``; returns the finished process
    (no time limit unless ``timeout``: the work is bounded by the arguments)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fewshot_cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fewshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``fewshot("eval", "ckpt=...")``: the CLI's ``main`` in this process, inside a temp folder,
    returning what ``cli`` returns (exit status, stdout, stderr). Seconds faster than ``cli``
    per call; for commands without signals, sweeps (-m), torchrun or other processes, where the
    exit status is all the test reads of how the process ended."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from fewshot_cli import cli as cli_module

    def run(*args: str, env: dict | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd or tmp_path)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        # as `python -m fewshot_cli` starts (the commands it prints name the fewshot script)
        monkeypatch.setattr(sys, "argv", [str(REPO / "fewshot_cli" / "__main__.py")])
        sigint = signal.getsignal(signal.SIGINT)  # an error sentence ignores Ctrl-C from then on
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level  # Hydra's and resume's console logging
        capsys.readouterr()
        try:
            cli_module.main(list(args))
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else int(done.code is not None)
        finally:
            signal.signal(signal.SIGINT, sigint)
            GlobalHydra.instance().clear()  # as a new process would find them
            HydraConfig.instance().cfg = None
            cli_module._failures.clear()
            root.handlers[:], root.level = handlers, level
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["fewshot", *args], code, out, err)

    return run


@pytest.fixture
def cli(tmp_path: Path):
    """``cli("train", "dataset=glyphs", ...)`` runs the real CLI inside a temp folder."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        return run_cli(list(args), cwd or tmp_path, timeout=timeout, env=env)

    return run


def eval_result(run: Path, ways: int, shots: int, ckpt: str = "best.pt", **match) -> dict:
    """The one results.json entry that ``fewshot eval`` wrote for ``ckpt`` and this task shape
    (and any other settings given in ``match``, e.g. ``episodes=600``)."""
    entries = json.loads((run / "results.json").read_text())[ckpt].values()
    found = [r for r in entries if r["ways"] == ways and r["shots"] == shots
             and all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} results for {ways}-way {shots}-shot {match}: {entries}"
    return found[0]
