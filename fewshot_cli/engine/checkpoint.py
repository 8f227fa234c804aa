"""Checkpoints: everything needed to rebuild, evaluate and exactly resume a run."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_torch_save

FORMAT = "fewshot-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (config, step, model, optimizer, scheduler, RNG...) atomically."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is a clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FewshotError(f"checkpoint {path} does not exist; pass the path of a best.pt or "
                           "last.pt written by fewshot train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            OSError) as err:
        raise FewshotError(f"{path} is not a fewshot checkpoint (it could not be read: "
                           f"{str(err).splitlines()[0][:120]})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FewshotError(f"{path} is not a fewshot checkpoint; pass a best.pt or last.pt "
                           "written by fewshot train")
    if state.get("version") != VERSION:
        raise FewshotError(f"{path} was written by checkpoint format version "
                           f"{state.get('version')}, this fewshot reads version {VERSION}")
    return state
