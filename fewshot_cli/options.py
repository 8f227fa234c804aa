"""The options of every command, checked in one place before anything is built or read.

Hydra composes the config but keeps whatever type a value was typed as (``train.ways=abc`` is
the string "abc"); these rules turn such a value into one sentence naming the key, what it
must be and an example, before any data is decoded. ``RULES`` holds each command's rules and
``PATHS`` each command's path keys (what the path must be, whether the command needs it); a new
command adds its entry to both. Options of one algorithm, backbone or data set are checked by
its constructor, the optimizer and schedule by ``build.check_optimizer``, also before any data
is read. Torch-free, so a typo costs no torch start-up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fewshot_cli.errors import FewshotError
from fewshot_cli.files import advice
from fewshot_cli.shell import arg


@dataclass(frozen=True)
class Rule:
    """What ``key`` must be: ``kind`` ("int", "float", "choice", "int_or_auto"), an optional
    test of the value, the words for the message and an example."""

    kind: str
    test: Callable[[Any], bool] | None
    words: str
    example: str


#: the largest count any option may hold: it sizes a tensor or a loop (32-bit indexing)
SIZE_MAX = 2**31 - 1
#: the largest seed: a 64-bit generator state, with room for the offsets added to it
#: (validation draws with eval.seed + 1)
SEED_MAX = 2**63 - 1


def _int(low: int, example: int, words: str | None = None, high: int = SIZE_MAX) -> Rule:
    return Rule("int", lambda v: low <= v <= high,
                words or f"a whole number of at least {low} and at most {high}", str(example))


def _seed(example: int) -> Rule:
    return _int(0, example, f"a whole number of at least 0 and at most {SEED_MAX} (a 64-bit "
                "seed)", SEED_MAX)


def _number(low: float, strict: bool, example: str) -> Rule:
    words = f"a {'positive' if strict and low == 0 else 'non-negative'} number" if low == 0 \
        else f"a number of at least {low}"
    return Rule("float", lambda v: (v > low if strict else v >= low) and math.isfinite(v), words,
                example)


POSITIVE_FLOAT = _number(0, True, "0.001")
# Rotations that make classes (eval.rotations, dataset.rotations): each quarter turn once, named
# one way, so [0,360] or [90,-270] cannot make two classes of one character.
QUARTER_TURNS = Rule("int_list", lambda v: len(v) > 0 and len(set(v)) == len(v) and
                     all(r % 90 == 0 and 0 <= r < 360 for r in v),
                     "a list of distinct multiples of 90 degrees from 0 to 270",
                     "[0,90,180,270]")
EPISODE = {"ways": _int(2, 5), "shots": _int(1, 1), "queries": _int(1, 15)}

TRAIN_RULES: dict[str, Rule] = {
    "seed": _seed(0),
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
# The optimizer's and the schedule's options by name, whichever torch.optim class takes them
# (build.check_optimizer then checks that the class takes them, and steps it once).
OPTIM_OPTIONS: dict[str, Rule] = {
    "lr": POSITIVE_FLOAT,
    "momentum": _number(0, False, "0.9"),
    "dampening": _number(0, False, "0"),
    "weight_decay": _number(0, False, "0.0005"),
    "eps": _number(0, True, "1e-08"),
    # not finite: gamma=inf is how the tests make a run diverge on purpose
    "gamma": Rule("float", lambda v: v > 0, "a positive number", "0.5"),
    "step_size": _int(1, 2000),
    "T_max": _int(1, 5000),
    "eta_min": _number(0, False, "0"),
    "milestones": Rule("int_list", lambda v: all(1 <= m <= SIZE_MAX for m in v),
                       f"a list of whole numbers of at least 1 and at most {SIZE_MAX}",
                       "[2000,4000]"),
}
OPTIM_RULES: dict[str, Rule] = {
    "train.optimizer._target_": Rule("choice", lambda v: v.startswith("torch.optim.") and
                                     not v.startswith("torch.optim.lr_scheduler."),
                                     "an optimizer class of torch.optim", "torch.optim.SGD"),
    "train.scheduler._target_": Rule("choice", lambda v: v.startswith("torch.optim.lr_scheduler."),
                                     "a schedule class of torch.optim.lr_scheduler",
                                     "torch.optim.lr_scheduler.CosineAnnealingLR"),
    **{f"train.{part}.{name}": rule for part in ("optimizer", "scheduler")
       for name, rule in OPTIM_OPTIONS.items()},
}
EVAL_RULES: dict[str, Rule] = {
    **{f"eval.{k}": r for k, r in EPISODE.items()},
    "eval.episodes": _int(1, 600),
    "eval.batch": Rule("int_or_auto", lambda v: 1 <= v <= SIZE_MAX,
                       f"auto or a whole number of at least 1 and at most {SIZE_MAX}", "auto"),
    "eval.seed": _seed(2024),
    "eval.rotations": QUARTER_TURNS,
    "eval.query_statistics": Rule("choice", lambda v: v in ("inductive", "transductive"),
                                  "inductive or transductive (null: as the model was trained)",
                                  "inductive"),
}
# A data set's own options are checked by its reader's constructor; these too, before any
# command reads a thing (fewshot data included).
DATASET_RULES: dict[str, Rule] = {"dataset.rotations": QUARTER_TURNS}
DEVICE_RULES: dict[str, Rule] = {
    "device.type": Rule("choice", lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda",
                        "cpu"),
    "device.precision": Rule("choice", lambda v: v in ("fp32", "bf16"), "fp32 or bf16", "fp32"),
    "device.memory_format": Rule("choice",
                                 lambda v: v in ("auto", "channels_last", "contiguous"),
                                 "auto, channels_last or contiguous", "auto"),
    "device.threads": Rule("int_or_auto", lambda v: 1 <= v <= 1024,
                           "auto or a whole number of threads from 1 to 1024", "auto"),
}


# The whole-number options of the algorithms, backbones, data sets and augmentations, each with
# its range: the floor is the one its constructor states (it checks it again, with the paper's
# reason), the ceiling is where the number stops fitting (a 64-bit seed, a tensor's size).
# Checked here so that a number that cannot fit is one sentence before torch starts. A new
# whole-number option joins this table (tests/test_options.py reads conf/ to make sure).
WHOLE_NUMBERS: dict[str, tuple[int, int]] = {
    "algo.finetune_seed": (0, SEED_MAX), "dataset.seed": (0, SEED_MAX),
    **{f"algo.{key}": (low, SIZE_MAX) for key, low in (
        ("channels", 1), ("hidden", 1), ("inner_steps", 1), ("eval_inner_steps", 0),
        ("inner_batch", 1), ("eval_inner_batch", 1), ("fce_steps", 1), ("finetune_batch", 1),
        ("finetune_steps", 0), ("first_order_until", 0), ("msl_anneal_steps", 0),
        ("logistic_max_iter", 1), ("generators.attention.memory", 1), ("task_chunk", 1))},
    **{f"backbone.{key}": (low, SIZE_MAX) for key, low in (
        ("hidden", 1), ("widths", 1), ("fc", 1), ("out_channels", 1), ("padding", 0),
        ("pooled_blocks", 0), ("block_size", 1), ("anneal_steps", 0))},
    **{f"dataset.{key}": (low, SIZE_MAX) for key, low in (
        ("image_size", 1), ("channels", 1), ("images_per_class", 2), ("min_images", 1),
        ("classes.train", 1), ("classes.val", 1), ("classes.test", 1), ("arms", 2),
        ("pulls", 1), ("gittins_max_pulls", 0), ("ots_samples", 0))},
    "dataset.rotations": (0, 359),
    "augment.crop_padding": (0, SIZE_MAX),
}


def _whole(key: str, low: int, high: int) -> Rule:
    rule = _seed(0) if high == SEED_MAX else _int(low, max(low, 1), high=high)
    listed = ", or a list of them" if key.endswith(("widths", "rotations")) else ""
    return Rule("whole", lambda v: all(rule.test(x) for x in (v if _is_list(v) else [v])),
                rule.words + listed, rule.example)


WHOLE_RULES: dict[str, Rule] = {key: _whole(key, *bounds) for key, bounds in WHOLE_NUMBERS.items()}

PREDICT_RULES: dict[str, Rule] = {
    "batch": _int(1, 64),
    # with a pretrained backbone= and no ckpt= (no training)
    "distance": Rule("choice", lambda v: v in ("cosine", "sqeuclidean"), "cosine or sqeuclidean",
                     "cosine"),
    "image_size": _int(1, 224, f"a whole number of pixels of at least 1 and at most {SIZE_MAX}"),
}


def _or_null(rules: Mapping[str, Rule]) -> dict[str, Rule]:
    """The same rules, with null allowed: ``fewshot eval`` keeps the stored value for null."""
    return {key: replace(rule, kind=f"{rule.kind}|null", words=f"{rule.words}, or null")
            for key, rule in rules.items()}


RULES: dict[str, dict[str, Rule]] = {  # every command's rules, by command name
    "train": {**TRAIN_RULES, **OPTIM_RULES, **EVAL_RULES, **DEVICE_RULES, **WHOLE_RULES,
              **DATASET_RULES},
    "eval": {**_or_null(EVAL_RULES), **DEVICE_RULES, **WHOLE_RULES, **DATASET_RULES},
    "predict": {**PREDICT_RULES, **DEVICE_RULES, **WHOLE_RULES},
    "data": {**WHOLE_RULES, **DATASET_RULES},  # the rest: its reader's constructor
    "report": {},
}
RULES["reproduce"] = RULES["train"]  # a preset's training run, then its tests


def _typed(rule: Rule, value: Any) -> bool:
    """Whether ``value`` has the type ``rule`` needs (bools are not numbers here)."""
    if rule.kind.endswith("|null"):
        return value is None or _typed(replace(rule, kind=rule.kind[:-5]), value)
    if isinstance(value, bool):
        return False
    if rule.kind == "int_list":
        return _is_list(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in value)
    if rule.kind == "int":
        return isinstance(value, int)
    if rule.kind == "float":
        return isinstance(value, (int, float))
    if rule.kind == "float_or_null":
        return value is None or isinstance(value, (int, float))
    if rule.kind == "int_or_auto":
        return value == "auto" or isinstance(value, int)
    if rule.kind == "whole":  # null and words are the constructor's to judge, not fractions
        values = value if _is_list(value) else [value]
        return all(v is None or isinstance(v, (int, str)) for v in values)
    return isinstance(value, str)


def _passes(rule: Rule, value: Any) -> bool:
    if not _typed(rule, value):
        return False
    if value is None or value == "auto" and rule.kind.startswith("int_or_auto"):
        return True
    if rule.kind == "whole":
        values = value if _is_list(value) else [value]
        return rule.test is None or rule.test([v for v in values if isinstance(v, int)])
    return rule.test is None or rule.test(value)


def _is_list(value: Any) -> bool:
    """A list or tuple, or OmegaConf's ListConfig (a Sequence that is not a str)."""
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and \
        hasattr(value, "__getitem__") and not isinstance(value, Mapping)


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
        if found:
            check_value(key, value, rule)


def check_value(key: str, value: Any, rule: Rule) -> None:
    """Raise a FewshotError naming ``key=value``, what it must be and an example, unless
    ``value`` passes ``rule``."""
    if not _passes(rule, value):
        shown = "null" if value is None else \
            f"[{','.join(map(str, value))}]" if _is_list(value) else value
        raise FewshotError(f"{key}={shown} must be {rule.words} (for example "
                           f"{key}={rule.example})")


# A preset's second stage says which run it starts from with ``init_from: "required: <what>"``
# (OmegaConf's ``???`` cannot do it: merged over train.yaml's null it leaves the null).
REQUIRED = "required:"


# What one fixed task costs in memory at least before it is scored: the sampler draws every
# fixed task up front (so that they are the same whatever the batch), two small tensors of
# int64 indices each (torch's bookkeeping of a tensor is about 1 kB; measured 3.2 kB a task).
TASK_OVERHEAD_BYTES = 2 * 1024
#: the fixed-task counts, and the section that gives their task shape
FIXED_TASKS = {"train.val_episodes": "eval", "eval.episodes": "eval"}


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fixed_tasks(cfg: Mapping, keys: tuple[str, ...]) -> None:
    """Raise a FewshotError where the fixed tasks that ``keys`` count (of FIXED_TASKS) would
    take more memory than this machine has, estimated from below before any is drawn: a
    count of 10**20 is one sentence, not a process growing until the system stops it."""
    memory = physical_memory()
    for key in keys:
        found, episodes = lookup(cfg, key)
        shape = {k: lookup(cfg, f"{FIXED_TASKS[key]}.{k}")[1] for k in ("ways", "shots", "queries")}
        if not found or memory is None or not isinstance(episodes, int) or \
                not all(isinstance(v, int) for v in shape.values()):
            continue
        per_task = TASK_OVERHEAD_BYTES + 8 * shape["ways"] * (1 + shape["shots"] + shape["queries"])
        if episodes * per_task > memory:
            raise FewshotError(
                f"{key}={episodes} fixed tasks would take at least "
                f"{episodes * per_task / 2**30:.3g} GiB of memory before the first is scored, "
                f"more than this machine's {memory / 2**30:.3g} GiB; lower {key} (at most "
                f"{memory // per_task} here; for example {key}={RULES['train'][key].example})")


def check_train(cfg: Mapping) -> None:
    """The options of ``fewshot train`` (the optimizer's and schedule's included), and an
    ``init_from`` a preset requires."""
    check_required(cfg)
    check(cfg, RULES["train"])
    check_fixed_tasks(cfg, ("train.val_episodes",))


def check_required(cfg: Mapping) -> None:
    """Raise a FewshotError when a preset's ``init_from`` still says which run it needs."""
    init = cfg.get("init_from")
    if isinstance(init, str) and init.startswith(REQUIRED):
        raise FewshotError(f"this preset starts from another run's checkpoint: add "
                           f"init_from=PATH, {init.removeprefix(REQUIRED).strip()}")


def check_command(command: str, cfg: Mapping) -> None:
    """Check every option of ``command`` that ``cfg`` holds: types, ranges (``RULES``) and
    paths (``PATHS``). Torch-free; the CLI calls it before any command reads anything.

    Raises:
        FewshotError: one sentence naming the first bad key, what it must be and an example.
    """
    if "init_from" in PATHS.get(command, {}):
        check_required(cfg)  # before check_paths reads "required: ..." as a missing file
    check(cfg, RULES.get(command, {}))
    if command in ("train", "reproduce"):
        check_fixed_tasks(cfg, ("train.val_episodes",))
    check_paths(command, cfg)


# ---------------------------------------------------------------- removed keys

# Keys of earlier versions that are gone: what replaces each, and whether a value of it asks for
# something (an old checkpoint's config may hold one at its old default, which asked for
# nothing and is dropped by build.py; one that asks is refused in one sentence).
REMOVED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "dataset.augment": ("augment=standard with augment.crop_padding, augment.flip and "
                        "augment.color_jitter",
                        lambda v: not isinstance(v, Mapping) or any(v.values())),
    "algo.distortions": ("augment=affine", bool),
    "algo.distortion_prob": ("augment=affine augment.prob=P", lambda v: False),
}


def removed_key(key: str) -> str | None:
    """The sentence for ``key`` when it is (or lies under) a removed key, else None."""
    for old, (new, _) in REMOVED.items():
        if key == old or key.startswith(f"{old}."):
            return f"{key} was removed; use {new}"
    return None


# ---------------------------------------------------------------- path keys


@dataclass(frozen=True)
class PathKey:
    """A key that takes a path: what the path must be, and whether the command needs it.

    ``kind``: ``checkpoint`` (a best.pt or last.pt), ``file``, ``folder``, ``file_or_folder``
    (an input that must exist), ``new_file``/``new_folder`` (an output: not the other kind, in a
    writable place), ``any`` (a data set's root: its reader checks it). ``needed``: the words for
    a command that cannot run without it (None: optional). ``sweep``: under ``-m``, a comma list
    is a sweep over several paths (never for output folders and ``resume``). ``or_name``: a
    value that names no file may be a name instead (``backbone.weights=DEFAULT``).

    Every path key behaves the same: ``~`` is the home folder, and a relative path is relative
    to the folder the command was typed in, also under ``hydra.job.chdir=true``
    (:func:`from_launch_folder`).
    """

    kind: str
    needed: str | None = None
    sweep: bool = True
    or_name: bool = False


WEIGHTS = PathKey("any", or_name=True)  # a file, or a weights name of torchvision's
CHECKPOINT = "the best.pt or last.pt of a run (fewshot train prints it when it ends)"
HYDRA_FOLDERS = {"hydra.run.dir": PathKey("new_folder", sweep=False),
                 "hydra.sweep.dir": PathKey("new_folder", sweep=False)}
PATHS: dict[str, dict[str, PathKey]] = {  # every command's path keys, by command name
    "train": {"resume": PathKey("checkpoint", sweep=False), "init_from": PathKey("checkpoint"),
              "dataset.root": PathKey("any"), "backbone.weights": WEIGHTS,
              **HYDRA_FOLDERS,
              "hydra.launcher.submitit_folder": PathKey("new_folder", sweep=False)},
    "eval": {"ckpt": PathKey("checkpoint", CHECKPOINT), "dataset.root": PathKey("any"),
             **HYDRA_FOLDERS},
    # ckpt= or, with no training, a pretrained backbone= (predict.py says which is missing)
    "predict": {"ckpt": PathKey("checkpoint"), "backbone.weights": WEIGHTS,
                "support": PathKey("folder", "a folder holding one sub-folder of images per "
                                             "class"),
                "query": PathKey("file_or_folder", "an image, or a folder of images"),
                "out": PathKey("new_file", sweep=False), **HYDRA_FOLDERS},
    "data": {"dataset.root": PathKey("any"), **HYDRA_FOLDERS},
    "report": {"dir": PathKey("folder", "the folder to summarise, a sweep such as "
                                        "multirun/<date>/<time> (fewshot report DIR)"),
               "out": PathKey("new_folder", sweep=False), **HYDRA_FOLDERS},
}
PATHS["reproduce"] = PATHS["train"]


def path_keys() -> dict[str, PathKey]:
    """Every path key of every command (the first command's rule where two share a key)."""
    keys: dict[str, PathKey] = {}
    for table in PATHS.values():
        for key, rule in table.items():
            keys.setdefault(key, rule)
    return keys


def from_launch_folder(command: str, cfg: Any, launch: Path) -> None:
    """Make every relative path key of ``command`` in ``cfg`` (an OmegaConf config, changed in
    place) relative to ``launch``, the folder the command was typed in: under
    ``hydra.job.chdir=true`` the task runs in its run folder, where a path typed relative to
    the user's folder would name another file. Hydra's own folders are Hydra's (already so);
    interpolations, and names (``or_name``) that are no file of ``launch`` and hold no ``/``,
    are left as they are."""
    from omegaconf import OmegaConf

    for key, rule in PATHS.get(command, {}).items():
        value = OmegaConf.select(cfg, key, default=None) if not key.startswith("hydra.") \
            else None
        if not isinstance(value, str) or not value or "${" in value:
            continue
        path = Path(value).expanduser()
        if path.is_absolute() or rule.or_name and "/" not in value and \
                not os.path.lexists(launch / path):
            continue
        OmegaConf.update(cfg, key, str(launch / path), merge=False)


def check_paths(command: str, cfg: Mapping) -> None:
    """Raise a FewshotError for the first path key of ``command`` that is missing while needed,
    or names the wrong kind of thing (a folder for a file...), a broken or unwritable place."""
    for key, rule in PATHS.get(command, {}).items():
        found, value = lookup(cfg, key)
        if not found:
            continue
        if value is None or value == "":
            if rule.needed:
                raise FewshotError(f"fewshot {command} needs {key}=PATH: {rule.needed}")
            continue
        problem = path_problem(key, str(value), rule.kind)
        if problem:
            raise FewshotError(problem)


def _stat(path: Path) -> os.stat_result | OSError | None:
    """The path's status, None when it does not exist, or the OSError that stopped the look."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as err:
        return err


def _nearest_existing(path: Path) -> Path:
    """The closest folder above ``path`` that exists (the current folder at worst)."""
    for parent in path.absolute().parents:
        if parent.is_dir():
            return parent
    return Path.cwd()


def path_problem(key: str, value: str, kind: str) -> str | None:
    """What is wrong with ``key=value`` for a path of ``kind`` (see PathKey), in one sentence
    naming the key and the fix, or None. Looks at the file system only (stat, access)."""
    path = Path(value).expanduser()
    status, shown = _stat(path), arg(key, value)
    if isinstance(status, OSError):
        return f"{shown} cannot be used: {status.strerror}; {advice(status)}"
    if status is None and kind in ("checkpoint", "file", "folder", "file_or_folder"):
        near = _nearest_existing(path)
        hint = "" if near == path.absolute().parent else f" (nor does its folder; the " \
            f"nearest that exists is {near})"
        return f"{shown} does not exist{hint}; check the path for a typo"
    if status is None:  # an output to create (a data set root is its reader's business)
        return _unwritable(key, value, _nearest_existing(path)) if kind.startswith("new_") \
            else None
    is_folder = path.is_dir()
    if kind == "checkpoint" and is_folder:
        return _checkpoint_folder(key, path)
    if kind in ("file", "new_file") and is_folder:
        return f"{shown} is a folder; give the path of a file" + (
            " (inside it, or elsewhere)" if kind == "new_file" else "")
    if kind in ("folder", "new_folder") and not is_folder:
        return f"{shown} is a file, not a folder; give a folder" + (
            " (a new path is created)" if kind == "new_folder" else "")
    if kind.startswith("new_"):
        return _unwritable(key, value, path if is_folder else path.parent)
    return None


def _checkpoint_folder(key: str, folder: Path) -> str:
    """The sentence for a folder given where a checkpoint file is expected."""
    names = ("last.pt", "best.pt") if key == "resume" else ("best.pt", "last.pt")
    inside = [arg(key, folder / name) for name in names if (folder / name).is_file()]
    if inside:
        return f"{arg(key, folder)} is a folder, not a checkpoint; name the checkpoint in it: " + \
            " or ".join(inside)
    return f"{arg(key, folder)} is a folder holding no best.pt or last.pt; give the path of a " \
        "checkpoint file written by fewshot train"


def _unwritable(key: str, value: str, folder: Path) -> str | None:
    """The sentence when the output ``key=value`` cannot be created in ``folder``, or None."""
    if os.access(folder, os.W_OK):
        return None
    try:  # the reason in the system's words: a read-only mount, or permissions
        reason = "it is read-only" if os.statvfs(folder).f_flag & os.ST_RDONLY else \
            "you may not write there"
    except OSError:
        reason = "you may not write there"
    return f"{arg(key, value)} cannot be written: {reason} ({folder}); give {key} a path in a " \
        "writable folder"
