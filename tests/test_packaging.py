"""pyproject.toml states version ranges, never pins: `pip install fewshot` next to a researcher's
own torch (or Hydra, Kornia, ...) keeps it when it lies in the range. The floors are proved by
scripts/check_floor.sh and recorded in docs/development.md#supported-versions."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomli comes with the dev extra on Python 3.10
    import tomli as tomllib

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = PROJECT["dependencies"] + [
    req for extra in PROJECT["optional-dependencies"].values() for req in extra]


@pytest.mark.parametrize("line", REQUIREMENTS)
def test_every_dependency_is_a_range_with_a_floor_and_no_pin(line: str):
    """Each dependency, extras included: no ``==`` (or ``===``), a lower bound (the oldest
    release fewshot is checked on) and an upper one (the next major release)."""
    req = Requirement(line)
    operators = {spec.operator for spec in req.specifier}
    assert not operators & {"==", "==="}, f"{line!r} pins {req.name}: state a range"
    assert operators & {">=", ">", "~="}, f"{line!r} has no lower bound: name the oldest " \
        f"{req.name} fewshot works with"
    assert operators & {"<", "~="}, f"{line!r} has no upper bound: allow up to the next major"


def test_the_declared_pythons_are_the_ones_the_code_is_written_for():
    """requires-python and the classifiers agree with ruff's target (py310): 3.10 to 3.13."""
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]
    assert PROJECT["requires-python"] == ">=3.10" and ruff["target-version"] == "py310"
    pythons = sorted(c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"]
                     if c.startswith("Programming Language :: Python :: 3."))
    assert pythons == ["3.10", "3.11", "3.12", "3.13"]
