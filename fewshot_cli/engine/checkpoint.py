"""Checkpoints: everything needed to rebuild, evaluate and exactly resume a run."""

from __future__ import annotations

import functools
import pickle
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.config import check_stored_config
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_torch_save, write_failure

FORMAT = "fewshot-checkpoint"
VERSION = 1
NOT_OURS = "pass a best.pt or last.pt written by fewshot train"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (config, step, model, optimizer, scheduler, RNG...) atomically; a failed
    write (full disk, lost permission) leaves the previous file as it was."""
    try:
        atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)
    except (OSError, RuntimeError) as err:
        raise write_failure(path, err, "the previous checkpoint there is unchanged") from None


@functools.cache
def code_version() -> dict[str, Any]:
    """The code running now: ``{"commit": sha, "dirty": bool}`` when fewshot runs from a git
    checkout (dirty: tracked files differ from the commit), else ``{"package": version}``.
    Checkpoints record it under ``"code"``, so a figure names the code that trained it."""
    repo = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(repo)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == repo:
            sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=30, check=True)
            return {"commit": sha, "dirty": bool(changed.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass  # no git on this machine: an installed package names its version
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"package": version("fewshot")}
    except PackageNotFoundError:
        return {"package": "unknown"}


def _unreadable(path: Path, err: BaseException) -> str:
    """Why ``path`` could not be read, in words (torch's own messages are pages long)."""
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    if isinstance(err, OSError):
        return f"it could not be read ({err.strerror or err})"
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        return "it is not a file written by torch.save"
    if isinstance(err, pickle.UnpicklingError) and "Weights only" in str(err):
        return ("it holds Python objects other than tensors and plain values, which fewshot "
                "never unpickles because they could run code")
    return "it is not a complete file written by torch.save"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is a clear error.

    Only tensors and plain values are unpickled (``weights_only``), and the stored config is
    checked to name none but fewshot's own builders before anyone builds from it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FewshotError(f"checkpoint {path} does not exist; {NOT_OURS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or torn files
        raise FewshotError(f"{path} is not a fewshot checkpoint: {_unreadable(path, err)}; "
                           f"{NOT_OURS}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FewshotError(f"{path} is not a fewshot checkpoint; {NOT_OURS}")
    if state.get("version") != VERSION:
        raise FewshotError(f"{path} was written by checkpoint format version "
                           f"{state.get('version')}, this fewshot reads version {VERSION}")
    check_stored_config(state.get("config"), path)
    return state
