"""Compose a preset exactly as ``fewshot train experiment=NAME`` does, as plain data."""

from __future__ import annotations

import os
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fewshot_cli.cli import GROUPS
from fewshot_cli.config import conf_dir

DATA = "/FEWSHOT_DATA"  # stands for $FEWSHOT_DATA, so data roots compare across machines


def composed(overrides: list[str]) -> dict[str, Any]:
    """The resolved config (Hydra's own section left out) with the group options chosen, as
    the CLI records them in ``choices``."""
    before = os.environ.get("FEWSHOT_DATA")
    os.environ["FEWSHOT_DATA"] = DATA
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("train", overrides, return_hydra_config=True)
        choices = cfg.hydra.runtime.choices
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        out = OmegaConf.to_container(plain, resolve=True)
    finally:
        if before is None:
            del os.environ["FEWSHOT_DATA"]
        else:
            os.environ["FEWSHOT_DATA"] = before
    out["choices"] = {g: choices.get(g) for g in GROUPS}
    return out
