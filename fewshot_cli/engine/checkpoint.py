"""Checkpoints: everything needed to rebuild, evaluate and exactly resume a run."""

from __future__ import annotations

import functools
import pickle
import re
import subprocess
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.config import check_stored_config, conf_dir
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


def init_backbone(algo: torch.nn.Module, path: str | Path, run: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """Copy the backbone weights (and BatchNorm statistics) of the checkpoint at ``path`` into
    ``algo.backbone`` before training (``init_from=``): a metric learner started from a
    classifier-pretrained backbone (Meta-Baseline, Chen et al. 2021). ``run`` is this run's
    config, to name the settings that differ when the weights do not fit. Returns what the run
    records about its start: the checkpoint's resolved path, step and algorithm.

    Raises:
        FewshotError: the file is not a fewshot checkpoint, holds no backbone, or its backbone
            does not fit this run's (another architecture, width or image size).
    """
    source = Path(path).expanduser().resolve()
    try:
        state = load_checkpoint(source)
    except FewshotError as err:
        raise FewshotError(f"init_from={path}: {err}") from None
    config = state["config"]
    algo_name = (config.get("choices") or {}).get("algo") or \
        str(config.get("algo", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    weights = {k.removeprefix("backbone."): v for k, v in state["model"].items()
               if k.startswith("backbone.")}
    if not weights or not hasattr(algo, "backbone"):
        holder = f"{source} (algo={algo_name})" if not weights else "this run's algorithm"
        raise FewshotError(f"init_from={path}: {holder} has no backbone weights to start from; "
                           "give the best.pt of an image run with a backbone (e.g. algo=baseline)")
    try:
        algo.backbone.load_state_dict(weights)
    except RuntimeError as err:
        detail = _mismatch(str(err))
        fix = " ".join(_differences(config, run)) or "the same backbone and image size"
        raise FewshotError(f"init_from={path}: its backbone does not fit this run's ({detail}); "
                           f"train with the settings it was trained with: {fix}") from None
    return {"path": str(source), "step": state["step"], "algo": algo_name}


def _mismatch(text: str) -> str:
    """torch's first complaint about a state dict, short: ``encoder.0.0.weight is [8, 1, 3, 3]
    there, [16, 1, 3, 3] here`` or ``missing encoder.4.weight``."""
    size = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(("
                     r"\[[^]]*\])\) from checkpoint, the shape in current model is "
                     r"torch\.Size\((\[[^]]*\])\)", text)
    if size:
        return f"{size.group(1)} is {size.group(2)} there, {size.group(3)} here"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"", text)
    if keys:
        return f"{keys.group(1).lower()} {keys.group(2)}"
    return text.strip().splitlines()[-1][:120]


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """``backbone=...``, ``backbone.<key>=...`` and ``dataset.image_size=...`` overrides that
    make ``ours`` build the backbone of ``theirs`` (keys compared with our backbone's, or with
    the defaults of theirs when the backbones differ)."""
    import yaml  # PyYAML comes with omegaconf

    out = []
    choice = (theirs.get("choices") or {}).get("backbone")
    mine, other = ours.get("backbone") or {}, theirs.get("backbone") or {}
    option = conf_dir() / "backbone" / f"{choice}.yaml"
    if mine.get("_target_") != other.get("_target_") and choice and option.is_file():
        out.append(f"backbone={choice}")
        mine = yaml.safe_load(option.read_text()) or {}
    shown = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else \
        str(v).replace(" ", "")
    out += [f"backbone.{key}={shown(value)}" for key, value in other.items()
            if key != "_target_" and mine.get(key) != value]
    size = (theirs.get("dataset") or {}).get("image_size")
    if size != (ours.get("dataset") or {}).get("image_size"):
        out.append(f"dataset.image_size={size}")
    return out
