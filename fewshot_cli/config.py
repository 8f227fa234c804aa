"""Where the config tree lives, and which callables a stored config may name.

A checkpoint carries the config of its run, and ``fewshot eval``/``resume``/``predict`` build
objects from it with Hydra's ``instantiate``, which calls whatever ``_target_`` names. A
checkpoint is shared between people, so before anything is built every ``_target_`` in it must
be one of fewshot's own builders (those named by the shipped config tree) or an optimizer or
learning-rate schedule class of ``torch.optim``.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fewshot_cli.errors import FewshotError


def conf_dir() -> Path:
    """The config tree: inside the installed wheel, else the repository's top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


@functools.cache
def own_targets() -> frozenset[str]:
    """Every ``fewshot_cli.`` builder a ``_target_`` of the shipped config tree names."""
    import yaml  # PyYAML comes with omegaconf

    found: set[str] = set()
    for path in conf_dir().rglob("*.yaml"):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        for doc in docs:
            found.update(value for key, value in _items(doc) if key == "_target_")
    return frozenset(t for t in found if isinstance(t, str) and t.startswith("fewshot_cli."))


def group_option(group: str, option: str) -> Any:
    """``conf/<group>/<option>.yaml`` as Hydra composes it (following its defaults: cpu.yaml is
    auto.yaml with one key changed), as a DictConfig of its own; the option must exist."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    inside_app = GlobalHydra.instance().is_initialized()  # fewshot reproduce runs in Hydra's app
    with contextlib.nullcontext() if inside_app else initialize_config_dir(
            str(conf_dir()), version_base="1.3"):
        node = compose("train", [f"{group}={option}"])[group]
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


def group_targets(group: str) -> dict[str, str]:
    """The ``_target_`` each option of a config group builds (``{"protonet": "fewshot_cli..."}``),
    following an option's defaults within its group (anil is maml with other keys)."""
    import yaml

    docs = {path.stem: yaml.safe_load(path.read_text()) or {}
            for path in sorted((conf_dir() / group).glob("*.yaml"))}

    def target(name: str, seen: tuple[str, ...] = ()) -> str | None:
        doc = docs.get(name)
        if not isinstance(doc, dict) or name in seen:
            return None
        if isinstance(doc.get("_target_"), str):
            return doc["_target_"]
        parents = [d for d in doc.get("defaults") or [] if isinstance(d, str) and d != "_self_"]
        return next((t for t in (target(p, (*seen, name)) for p in parents) if t), None)

    return {name: t for name in docs if (t := target(name))}


def _items(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (key, value) pair of nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _items(value)
    elif isinstance(node, list):
        for value in node:
            yield from _items(value)


def is_torch_optim_class(target: str) -> bool:
    """``torch.optim.X`` optimizers and ``torch.optim.lr_scheduler.X`` schedules, nothing else."""
    module, _, name = target.rpartition(".")
    if module not in ("torch.optim", "torch.optim.lr_scheduler") or name.startswith("_"):
        return False
    import torch

    owner = torch.optim if module == "torch.optim" else torch.optim.lr_scheduler
    obj = getattr(owner, name, None)
    bases = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
    return isinstance(obj, type) and issubclass(obj, bases)


def check_stored_config(config: Any, source: Path) -> None:
    """Refuse a stored config that names a callable outside fewshot's builders, or that still
    holds ``${...}`` interpolations (fewshot stores configs resolved), before anything is built."""
    if not isinstance(config, dict):
        raise FewshotError(f"{source} holds no run config; pass a best.pt or last.pt written by "
                           "fewshot train")
    allowed = own_targets()
    for key, value in _items(config):
        if key == "_target_" and not (isinstance(value, str) and (
                value in allowed or is_torch_optim_class(value))):
            raise FewshotError(f"{source} was refused: its config names {str(value)[:80]!r} to "
                               "build, which is not one of fewshot's builders; only load "
                               "checkpoints written by fewshot train")
        if isinstance(value, str) and "${" in value:
            raise FewshotError(f"{source} was refused: its config holds the interpolation "
                               f"{value[:80]!r}, which fewshot never stores; only load "
                               "checkpoints written by fewshot train")


# ---------------------------------------------------------------- what each key means

_KEY_LINE = re.compile(r"^( *)([\w.-]+):(.*)$")
_COMMENT = re.compile(r"(?:^|\s)#\s?(.*)$")


def yaml_comments(text: str, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment written beside it in a YAML file of conf/ (with the
    comment-only lines below it that are indented past the key, which continue it).
    ``prefix``: the key of the node the file fills (``algo`` for conf/algo/maml.yaml)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: tuple[str, int] | None = None  # the key whose comment may continue, its indent
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if last is not None and len(line) - len(line.lstrip()) > last[1]:
                out[last[0]] += " " + stripped.lstrip("#").strip()
            else:
                last = None
            continue
        m = _KEY_LINE.match(line)
        if not m:
            last = None
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        full = ".".join(([prefix] if prefix else []) + [k for _, k in stack])
        comment = _COMMENT.search(m.group(3))
        last = None
        if comment and comment.group(1).strip():
            out[full] = comment.group(1).strip()
            last = (full, indent)
    return out


def key_comments(config_name: str, choices: dict[str, str]) -> dict[str, str]:
    """Dotted key -> its meaning, for ``fewshot <config_name> --help``: the comments of
    conf/<config_name>.yaml and of every group's option files (the chosen option's first,
    ``choices``: group -> option), which are the documentation of the keys."""
    root = conf_dir()
    out: dict[str, str] = {}
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        files = sorted((root / group).glob("*.yaml"))
        chosen = [f for f in files if f.stem == choices.get(group)]
        for path in [*files, *chosen]:  # the chosen option's comments last: they win
            text = path.read_text()
            if "# @package" not in text:  # presets (experiment/) fill other nodes
                out.update(yaml_comments(text, group))
    out.update(yaml_comments((root / f"{config_name}.yaml").read_text()))
    return out


def annotate_yaml(text: str, comments: dict[str, str]) -> str:
    """``text`` (YAML, as ``--help`` prints a composed config) with each key's meaning from
    ``comments`` appended to its line as a comment."""
    stack: list[tuple[int, str]] = []
    lines = []
    for line in text.splitlines():
        m = _KEY_LINE.match(line)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            meaning = comments.get(".".join(k for _, k in stack))
            if meaning and "#" not in m.group(3):
                line = f"{line}  # {meaning}"
        lines.append(line)
    return "\n".join(lines)
