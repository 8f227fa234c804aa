"""The options every command shares, checked in one place before anything is built or read.

Hydra composes the config but keeps whatever type a value was typed as (``train.ways=abc`` is
the string "abc"); these rules turn such a value into one sentence naming the key, what it
must be and an example, before any data is decoded. Options of one algorithm, backbone or data
set are checked by its constructor, also before any data is read. Torch-free, so a typo costs
no torch start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fewshot_cli.errors import FewshotError


@dataclass(frozen=True)
class Rule:
    """What ``key`` must be: ``kind`` ("int", "float", "choice", "int_or_auto"), an optional
    test of the value, the words for the message and an example."""

    kind: str
    test: Callable[[Any], bool] | None
    words: str
    example: str


def _int(low: int, example: int, words: str | None = None) -> Rule:
    return Rule("int", lambda v: v >= low, words or f"a whole number of at least {low}",
                str(example))


POSITIVE_FLOAT = Rule("float", lambda v: v > 0 and math.isfinite(v), "a positive number",
                      "0.001")
EPISODE = {"ways": _int(2, 5), "shots": _int(1, 1), "queries": _int(1, 15)}

TRAIN_RULES: dict[str, Rule] = {
    "seed": _int(0, 0, "a whole number (0 or more)"),
    **{f"train.{k}": r for k, r in EPISODE.items()},
    "train.meta_batch": _int(1, 4),
    "train.batch_size": _int(1, 64),
    "train.steps": _int(1, 2000),
    "train.max_minutes": Rule("float_or_null", lambda v: v > 0 and math.isfinite(v),
                              "a positive number of minutes or null", "30"),
    "train.budget_clock": Rule("choice", lambda v: v in ("wall", "cpu"), "wall or cpu", "cpu"),
    "train.val_every": _int(1, 500),
    "train.val_episodes": _int(1, 200),
    "train.log_every": _int(1, 10),
    "train.lr": POSITIVE_FLOAT,
    "train.grad_clip": Rule("float_or_null", lambda v: v > 0 and math.isfinite(v),
                            "a positive number or null", "10"),
}
EVAL_RULES: dict[str, Rule] = {
    **{f"eval.{k}": r for k, r in EPISODE.items()},
    "eval.episodes": _int(1, 600),
    "eval.batch": Rule("int_or_auto", lambda v: v >= 1, "auto or a whole number of at least 1",
                       "auto"),
    "eval.seed": _int(0, 2024, "a whole number (0 or more)"),
}
DEVICE_RULES: dict[str, Rule] = {
    "device.type": Rule("choice", lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda",
                        "cpu"),
    "device.precision": Rule("choice", lambda v: v in ("fp32", "bf16"), "fp32 or bf16", "fp32"),
    "device.memory_format": Rule("choice",
                                 lambda v: v in ("auto", "channels_last", "contiguous"),
                                 "auto, channels_last or contiguous", "auto"),
}


def _typed(rule: Rule, value: Any) -> bool:
    """Whether ``value`` has the type ``rule`` needs (bools are not numbers here)."""
    if isinstance(value, bool):
        return False
    if rule.kind == "int":
        return isinstance(value, int)
    if rule.kind == "float":
        return isinstance(value, (int, float))
    if rule.kind == "float_or_null":
        return value is None or isinstance(value, (int, float))
    if rule.kind == "int_or_auto":
        return value == "auto" or isinstance(value, int)
    return isinstance(value, str)


def _passes(rule: Rule, value: Any) -> bool:
    if not _typed(rule, value):
        return False
    if value is None or value == "auto" and rule.kind == "int_or_auto":
        return True
    return rule.test is None or rule.test(value)


def lookup(cfg: Mapping, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted key in nested mappings."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check(cfg: Mapping, rules: Mapping[str, Rule]) -> None:
    """Raise a FewshotError for the first key of ``rules`` whose value breaks its rule."""
    for key, rule in rules.items():
        found, value = lookup(cfg, key)
        if found and not _passes(rule, value):
            shown = "null" if value is None else value
            raise FewshotError(f"{key}={shown} must be {rule.words} (for example "
                               f"{key}={rule.example})")


# A preset's second stage says which run it starts from with ``init_from: "required: <what>"``
# (OmegaConf's ``???`` cannot do it: merged over train.yaml's null it leaves the null).
REQUIRED = "required:"


def check_train(cfg: Mapping) -> None:
    """The shared options of ``fewshot train``, and an ``init_from`` a preset requires."""
    init = cfg.get("init_from")
    if isinstance(init, str) and init.startswith(REQUIRED):
        raise FewshotError(f"this preset starts from another run's checkpoint: add "
                           f"init_from=PATH, {init.removeprefix(REQUIRED).strip()}")
    check(cfg, {**TRAIN_RULES, **EVAL_RULES, **DEVICE_RULES})
