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
    ``fewshot`` script that runs (a venv that is not activated). Started as ``python -m
    fewshot_cli`` (torchrun, a sweep's worker, tests), the commands still name the ``fewshot``
    script installed beside that Python; only without one (a bare source checkout) they name
    ``python -m fewshot_cli``."""
    argv0 = _program[0] if _program else sys.argv[0]
    started = Path(argv0).name == "fewshot"
    script = Path(argv0) if started else Path(sys.executable).with_name("fewshot")
    if started or script.is_file():  # the console script of this environment
        found = shutil.which("fewshot")
        if found and os.path.realpath(found) == os.path.realpath(script):
            return "fewshot"
        return shlex.quote(os.path.abspath(script))
    return f"{shlex.quote(sys.executable)} -m fewshot_cli"


def arg(key: str, value: object) -> str:
    """``key=value`` as one shell word: ``'ckpt=runs/a b/best.pt'`` (quoted only if needed).
    fewshot itself quotes path values for Hydra's grammar, so the value is written as is."""
    return shlex.quote(f"{key}={value}")


def command(subcommand: str, *args: str) -> str:
    """``fewshot eval 'ckpt=a b/best.pt'``: a command line to copy; ``args`` from :func:`arg`."""
    return " ".join([program(), subcommand, *args])
