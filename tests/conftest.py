"""Shared fixtures: the real Omniglot location, and running the real CLI in a temp folder."""

from __future__ import annotations

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


def run_cli(args: list[str], cwd: Path, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``fewshot <args>`` as a user would, from ``cwd``; returns the finished process."""
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
        # as `python -m fewshot_cli` starts: the commands it prints to copy name the module
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
            timeout: float = 600) -> subprocess.CompletedProcess:
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
