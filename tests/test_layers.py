"""The import graph of fewshot_cli runs downward only (DESIGN.md): commands -> build -> engine
-> algorithms -> backbones and data -> the ground floor; config stops at build.py (no omegaconf
below it). Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fewshot_cli"
COMMANDS = {"__main__", "cli", "train", "evaluate", "predict", "report", "reproduce",
            "data_check", "results"}
GROUND = {"__init__", "episode", "files", "errors", "intervals", "shell", "config", "options",
          "draws", "cores"}
FLOOR = {"build": 4, "engine": 3, "algorithms": 2, "backbones": 1, "data": 1}
NO_CONFIG = ("engine", "algorithms", "backbones", "data")  # plain values and typed records


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    """5 for a command, 4 build, 3 engine, 2 algorithms, 1 backbones and data, 0 the ground."""
    part = (module.split(".") + [""])[1] or "__init__"
    if part in COMMANDS:
        return 5
    if part in GROUND:
        return 0
    return FLOOR[part]


def imports(path: Path) -> set[str]:
    """Every module this file imports: ``fewshot_cli...`` ones as modules, others by top name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module in ("fewshot_cli", "fewshot_cli.data", "fewshot_cli.algorithms"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names
                          if (PACKAGE.parent / node.module.replace(".", "/")
                              / f"{alias.name}.py").exists()}
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_run_downward_and_config_stops_at_build(path: Path) -> None:
    module = module_name(path)
    own = floor(module)
    ours = {m for m in imports(path) if m.startswith("fewshot_cli.")}
    upward = sorted(m for m in ours if floor(m) > own)
    assert not upward, f"{module} (floor {own}) imports upward: {upward}"
    if (module.split(".") + [""])[1] in NO_CONFIG:
        assert not {m for m in imports(path) if m.split(".")[0] in ("omegaconf", "hydra")}, \
            f"{module} reads config: it should take plain values and typed records"
    if module.startswith("fewshot_cli.data"):
        assert not {m for m in ours if m.startswith("fewshot_cli.algorithms")}, module
    if module.startswith("fewshot_cli.algorithms"):
        assert not {m for m in ours if m.startswith("fewshot_cli.data")}, module


def test_every_module_has_a_floor() -> None:
    assert all(floor(module_name(p)) >= 0 for p in FILES)
