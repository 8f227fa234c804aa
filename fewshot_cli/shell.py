"""Commands printed for the user to copy: the program as it was started, arguments quoted for
the shell (``shlex.quote``), so a printed next step works when pasted as printed.

Ground floor: imports nothing of fewshot.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

_program: list[str] = []  # how this process was started, set by cli.main


def remember_program(argv0: str) -> None:
    """Record how the user started fewshot (``sys.argv[0]``), before Hydra rewrites argv."""
    _program[:] = [argv0]


def program() -> str:
    """``fewshot`` when that is what the shell finds on PATH; else the absolute path of the
    script that runs (a venv that is not activated), or ``python -m fewshot_cli`` (torchrun,
    tests)."""
    argv0 = _program[0] if _program else sys.argv[0]
    if Path(argv0).name == "fewshot":
        found = shutil.which("fewshot")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return "fewshot"
        return shlex.quote(os.path.abspath(argv0))
    return f"{shlex.quote(sys.executable)} -m fewshot_cli"


def arg(key: str, value: object) -> str:
    """``key=value`` as one shell word: ``'ckpt=runs/a b/best.pt'`` (quoted only if needed).
    fewshot itself quotes path values for Hydra's grammar, so the value is written as is."""
    return shlex.quote(f"{key}={value}")


def command(subcommand: str, *args: str) -> str:
    """``fewshot eval 'ckpt=a b/best.pt'``: a command line to copy; ``args`` from :func:`arg`."""
    return " ".join([program(), subcommand, *args])
