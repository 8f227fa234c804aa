"""The one place where config becomes objects: data set, backbone, algorithm, optimizer, and
the wiring of a whole training run (``wire_run``), which hands the trainer those objects and a
typed settings record; below this module nothing reads the config.

Every object is built by Hydra's ``instantiate`` from its group's ``_target_``; a failure is
turned into one sentence naming the config section (an option the class does not take, say).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshot_cli.algorithms.base import MetaAlgorithm
from fewshot_cli.config import group_targets, is_torch_optim_class
from fewshot_cli.data.augment import IDENTITY
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.splits import record_split
from fewshot_cli.data.store import ClassStore
from fewshot_cli.engine.checkpoint import init_backbone
from fewshot_cli.engine.distributed import Processes
from fewshot_cli.engine.runtime import (
    autocast_for,
    choose_threads,
    episodes_per_batch,
    forward_flops,
    memory_format_for,
    usable_cores,
)
from fewshot_cli.engine.trainer import MetaTrainer, RunParts, TrainSettings
from fewshot_cli.episode import IMAGE_TASKS, TaskShape
from fewshot_cli.errors import FewshotError
from fewshot_cli.options import REMOVED, removed_key


def _choice(cfg: DictConfig, section: str) -> str:
    """The group option a section came from (``algo=metasgd``), or its class name."""
    name = cfg.get("choices", {}).get(section) if "choices" in cfg else None
    return name or str(cfg[section].get("_target_", "?")).rsplit(".", 1)[-1]


def without_removed(cfg: DictConfig, section: str) -> DictConfig:
    """``cfg`` without the removed keys of ``section`` that ask for nothing (an old checkpoint's
    config holds them at their old defaults); one that asks for something is refused.

    Raises:
        FewshotError: naming the removed key and the key that replaces it (options.REMOVED).
    """
    node = cfg.get(section) if isinstance(cfg, DictConfig) else None
    present = [(old, asks) for old, (_, asks) in REMOVED.items()
               if old.startswith(f"{section}.") and isinstance(node, DictConfig)
               and old.split(".", 1)[1] in node]
    if not present:
        return cfg
    cfg = copy.deepcopy(cfg)
    for old, asks in present:
        key = old.split(".", 1)[1]
        value = cfg[section][key]
        if asks(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value):
            raise FewshotError(f"{removed_key(old)} (this config, or the stored config of an "
                               "older checkpoint, still sets it)")
        with open_dict(cfg):
            del cfg[section][key]
    return cfg


def build(cfg: DictConfig, section: str, label: str | None = None, **kwargs: Any) -> Any:
    """``instantiate(cfg[section], **kwargs)`` with its failures as one sentence naming
    ``label`` (default: the section)."""
    label = label or section
    cfg = without_removed(cfg, section)
    try:
        return instantiate(cfg[section], **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, FewshotError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        text = str(err.__cause__ or err)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", text)
        if unknown:
            key = unknown.group(1)
            raise FewshotError(f"{label}.{key} is not an option of {label}="
                               f"{_choice(cfg, section)}; remove it (the options are the keys "
                               f"`fewshot train --cfg job` shows under {label})") from None
        raise FewshotError(f"{label}={_choice(cfg, section)} could not be built: "
                           f"{text.strip().splitlines()[-1][:200]}") from None


def build_dataset(cfg: DictConfig) -> FewShotDataset:
    """The reader named by ``cfg.dataset._target_`` (checks its options, reads nothing yet),
    given plain values (dicts and lists, not DictConfig)."""
    return build(cfg, "dataset", _convert_="all")


def build_augment(cfg: DictConfig) -> torch.nn.Module:
    """The training augmentation of ``augment=``; none for checkpoints written before the
    group existed."""
    node = cfg.get("augment") or {"_target_": IDENTITY}
    return build(OmegaConf.create({"augment": node, "choices": cfg.get("choices") or {}}),
                 "augment", _convert_="all")


def task_kind(target: str) -> str:
    """The kind of task the class ``target`` names works on (backbones are plain nn.Modules:
    image networks unless they say otherwise)."""
    return getattr(get_class(target), "task_kind", IMAGE_TASKS)


def _options(group: str, kind: str) -> str:
    """``dataset=glyphs, dataset=miniimagenet or dataset=omniglot``: the options of a kind."""
    names = [f"{group}={name}" for name, target in group_targets(group).items()
             if task_kind(target) == kind]
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else "none"


def check_task_kinds(cfg: DictConfig) -> None:
    """One sentence when the data set, algorithm and backbone are not all made for the same
    kind of task (``algo=protonet dataset=bandits``, ``algo=rl2 backbone=conv4``)."""
    kinds = {section: task_kind(cfg[section]._target_)
             for section in ("dataset", "algo", "backbone")}
    algo, data, net = (_choice(cfg, s) for s in ("algo", "dataset", "backbone"))
    if kinds["algo"] != kinds["dataset"]:
        raise FewshotError(
            f"algo={algo} learns {kinds['algo']} tasks but dataset={data} holds "
            f"{kinds['dataset']} tasks; use {_options('dataset', kinds['algo'])} with "
            f"algo={algo}, or {_options('algo', kinds['dataset'])} with dataset={data}")
    if kinds["backbone"] != kinds["algo"]:
        raise FewshotError(
            f"backbone={net} is a network for {kinds['backbone']} tasks but algo={algo} learns "
            f"{kinds['algo']} tasks; use {_options('backbone', kinds['algo'])} (or leave "
            "backbone= out: each algorithm picks a fitting one)")


def task_shape(section: DictConfig) -> TaskShape:
    """The task shape of the ``train`` or ``eval`` section (``eval`` has no meta-batch: 1)."""
    return TaskShape(section.ways, section.shots, section.queries, section.get("meta_batch", 1),
                     bool(section.get("within_group")), bool(section.get("distinct_drawers")),
                     tuple(int(r) for r in section.get("rotations") or (0,)))


PAPER_QUERIES = 15  # query images per class in the papers' episodes (Snell et al., Finn et al.)


def source_key(cfg: DictConfig, key: str) -> str:
    """The key the user sets for ``key``: ``train.ways`` for ``eval.ways`` while that is
    ``${train.ways}``, followed through any chain of such interpolations."""
    for _ in range(10):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or not OmegaConf.is_interpolation(node, leaf):
            return key
        raw = str(node._get_node(leaf)._value())
        m = re.fullmatch(r"\$\{([\w.]+)\}", raw)
        if not m:
            return key
        key = m.group(1)
    return key


def check_episodes_fit(cfg: DictConfig, dataset: FewShotDataset,
                       shapes: Iterable[tuple[str, str]], decode: bool = False) -> None:
    """Whether episodes of each ``(section, split)`` of ``shapes`` (``("train", "train")``,
    ``("eval", "val")``) fit the classes of that split: before any decoding where the reader
    knows its class sizes (``class_sizes``), else only when ``decode`` allows loading them.

    Raises:
        FewshotError: one sentence naming every key that must change, as the user sets it
            (``train.ways`` for an ``eval.ways`` that follows it), with values that fit.
    """
    if dataset.task_kind != IMAGE_TASKS:
        return
    found: list[str] = []
    fixes: dict[str, int] = {}
    alone: dict[str, int] = {}  # the same fix on a key that follows another, set on its own

    def named(key: str, value: int | None = None, fits: int | None = None) -> str:
        """``key=value`` as the sentence names it (and the key it follows); ``fits``: a value
        that fits, recorded for the key the user sets."""
        source = source_key(cfg, key)
        if fits is not None:
            fixes[source] = min(fits, fixes.get(source, fits))
            if source != key:
                alone[key] = fits
        shown = key if value is None else f"{key}={value}"
        return shown if source == key else f"{shown} (from {source})"

    for section, split in shapes:
        node, sizes = cfg[section], dataset.class_sizes(split)
        if sizes is None and not decode:
            continue
        names: list[str] | None = None
        if sizes is None:  # decoded: the smallest class can be named
            store = dataset.load(split)
            sizes, names = store.counts.tolist(), list(store.names)
        rotations = len(set(node.get("rotations") or [0])) if dataset.rotatable else 1
        classes = len(sizes) * rotations
        if node.ways > classes:
            found.append(f"{named(f'{section}.ways', node.ways, classes)} exceeds the "
                         f"{classes} classes of the {split} split")
        smallest, need = min(sizes), node.shots + node.queries
        if need > smallest:
            shots = node.shots if node.shots < smallest else max(1, smallest - 1)
            queries = min(PAPER_QUERIES, max(1, smallest - shots))
            which = "per class" if len(set(sizes)) == 1 else "of the smallest class" + (
                f" ({names[sizes.index(smallest)]})" if names else "")
            fewer_shots = shots if shots != node.shots else None
            found.append(f"{named(f'{section}.shots', None, fewer_shots)} + "
                         f"{named(f'{section}.queries', None, queries)} = {need} exceeds the "
                         f"{smallest} images {which} of the {split} split")
    if found:
        setting = lambda values: " ".join(f"{k}={v}" for k, v in values.items())
        instead = f", or {setting(alone)} to change only those episodes" if alone else ""
        raise FewshotError(f"{'; '.join(found)}; set {setting(fixes)}{instead} (or add classes "
                           "and images)")


def build_algorithm(cfg: DictConfig, inputs: Mapping[str, Any] | ClassStore,
                    device: torch.device | None = None) -> MetaAlgorithm:
    """Backbone sized for the data (``dataset.input_spec()``, or a store's images), wrapped by
    the algorithm for ``train.ways``; the task shapes are checked against the model.

    Given a ``device``, the algorithm is moved there with the weight layout of
    ``device.memory_format`` (channels_last on the CPU unless the algorithm declines it).
    """
    check_task_kinds(cfg)
    if isinstance(inputs, ClassStore):
        inputs = {"in_channels": inputs.channels, "image_size": inputs.image_size}
    # Plain dicts and lists, not DictConfig/ListConfig, reach the networks and algorithms.
    backbone = build(cfg, "backbone", _convert_="all", **inputs)
    algo = build(cfg, "algo", backbone=backbone, ways=cfg.train.ways, _convert_="all")
    algo.check_tasks(task_shape(cfg.train), task_shape(cfg.eval))
    if device is None:
        return algo
    layout = memory_format_for(device, cfg.device.get("memory_format", "auto"),
                               algo.prefers_channels_last)
    return algo.to(device, memory_format=layout)


def build_optimizer(cfg: DictConfig, algo: MetaAlgorithm
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The meta-optimizer over all of the algorithm's parameters, and its schedule (or None).
    One sentence when none of them is trainable (a frozen backbone under an algorithm with no
    weights of its own)."""
    if not any(p.requires_grad for p in algo.parameters()):
        raise FewshotError(f"algo={_choice(cfg, 'algo')} has no weights of its own and "
                           "backbone.freeze=true fixes the backbone's, so there is nothing to "
                           "train; classify with the frozen features directly (fewshot predict "
                           "backbone=... with no ckpt), or set backbone.freeze=false")
    return _optimizer_and_schedule(cfg, algo.parameters())


def _optimizer_and_schedule(cfg: DictConfig, params: Iterable[torch.Tensor]
                            ) -> tuple[torch.optim.Optimizer,
                                       torch.optim.lr_scheduler.LRScheduler | None]:
    optimizer = build(cfg.train, "optimizer", "train.optimizer")(params)
    scheduler = build(cfg.train, "scheduler", "train.scheduler")(optimizer) \
        if cfg.train.scheduler else None
    return optimizer, scheduler


# What a section's class must be: checkpoints may name these classes too (config.py).
OPTIM_BASES = {"optimizer": ("an optimizer", torch.optim.Optimizer, "torch.optim.SGD"),
               "scheduler": ("a learning-rate schedule", torch.optim.lr_scheduler.LRScheduler,
                             "torch.optim.lr_scheduler.CosineAnnealingLR")}
SIMPLE_TYPES = {"int": (int, "a whole number"), "float": ((int, float), "a number"),
                "bool": (bool, "true or false"), "str": (str, "a string")}


def check_optimizer(cfg: DictConfig) -> None:
    """Build ``train.optimizer`` and ``train.scheduler`` on a dummy parameter and step each once,
    before any data is read: a class outside torch.optim, an option its class does not take, a
    value of the wrong type or one the class refuses is one sentence naming the key, not a
    traceback minutes into training.

    Raises:
        FewshotError: naming ``train.optimizer.*`` or ``train.scheduler.*`` and the fix.
    """
    for part, (words, base, example) in OPTIM_BASES.items():
        node = cfg.train.get(part)
        if node is None:
            continue
        target = node.get("_target_")
        if not (isinstance(target, str) and is_torch_optim_class(target)
                and issubclass(get_class(target), base)):
            raise FewshotError(f"train.{part}._target_={target} is not {words} class of "
                               f"torch.optim; name one (for example train.{part}._target_="
                               f"{example})")
        _check_types(f"train.{part}", get_class(target), node)
    dummy = torch.nn.Parameter(torch.zeros(1))
    dummy.grad = torch.ones(1)
    optimizer = _checked(cfg, "optimizer",
                         lambda: build(cfg.train, "optimizer", "train.optimizer")([dummy]))
    scheduler = _checked(cfg, "scheduler", lambda: build(cfg.train, "scheduler",
                                                         "train.scheduler")(optimizer)) \
        if cfg.train.scheduler else None
    _checked(cfg, "optimizer", optimizer.step)  # in the trainer's order: optimizer, schedule
    if scheduler is not None:
        _checked(cfg, "scheduler", scheduler.step)


def _checked(cfg: DictConfig, part: str, call: Any) -> Any:
    """``call()`` (building or stepping the optimizer or schedule); its failure as one sentence
    naming ``train.<part>``."""
    try:
        return call()
    except FewshotError:
        raise
    except Exception as err:  # noqa: BLE001 (any class of torch.optim, any refusal)
        raise FewshotError(f"train.{part}={_choice(cfg.train, part)} cannot be built or stepped "
                           f"as the trainer does ({type(err).__name__}: {str(err)[:160]}); "
                           f"check the options under train.{part}, or choose another class") \
            from None


def _check_types(section: str, cls: type, node: Mapping) -> None:
    """Each option given to ``cls`` is one it takes, of the type of its annotation (or, where
    that is not a plain type, of its default)."""
    params = inspect.signature(cls).parameters
    for key, value in node.items():
        if key.startswith("_") or (key not in params and any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())):
            continue
        if key not in params:
            takes = ", ".join(p for p in list(params)[1:] if not p.startswith("_"))
            raise FewshotError(f"{section}.{key} is not an option of {cls.__name__}; remove "
                               f"it (it takes {takes})")
        kind = _plain_type(params[key])
        types, words = SIMPLE_TYPES.get(kind, (object, ""))
        if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
            default = params[key].default
            example = "" if default is inspect.Parameter.empty or default is None else \
                f"; its default is {default}"
            raise FewshotError(f"{section}.{key}={value} must be {words} ({cls.__name__} takes "
                               f"{key}: {kind}{example})")


def _plain_type(param: inspect.Parameter) -> str | None:
    """``int``, ``float``, ``bool`` or ``str`` for a parameter that takes only that, else None."""
    annotation = str(param.annotation).removeprefix("<class '").removesuffix("'>")
    if annotation in SIMPLE_TYPES:
        return annotation
    default = param.default
    if isinstance(default, bool):
        return "bool"
    return "float" if isinstance(default, (int, float)) else None


# ---------------------------------------------------------------- a training run


def train_settings(cfg: DictConfig, val_batch: int) -> TrainSettings:
    """The loop's plain values from ``train.*``, ``eval.*`` and ``seed``."""
    t, e = cfg.train, cfg.eval
    return TrainSettings(steps=t.steps, meta_batch=t.meta_batch, log_every=t.log_every,
                         val_every=t.val_every, val_episodes=t.val_episodes,
                         val_batch=val_batch, val_seed=e.seed + 1, seed=cfg.seed,
                         grad_clip=t.grad_clip, batch_size=t.get("batch_size"),
                         max_minutes=t.get("max_minutes"),
                         budget_clock=t.get("budget_clock") or "wall")


def wire_run(cfg: DictConfig, device: torch.device, run_dir: Path,
             procs: Processes | None = None) -> MetaTrainer:
    """Everything a run needs, built from its config in the order that fails fastest: the
    meta-batch against the processes, the data set's options, then the model (its options and
    the task shapes are checked before any image is decoded), the split record (a leaking split
    is refused, the split written once, a resumed run checked against it), the task samplers,
    then the optimizer. Raises FewshotError naming the key of the first bad option."""
    t, e = cfg.train, cfg.eval
    procs = procs or Processes(device=device)
    procs.check_meta_batch(t.meta_batch)
    autocast = autocast_for(device, cfg.device.precision)
    dataset = build_dataset(cfg)
    trains_on = getattr(get_class(cfg.algo._target_), "trains_on", "episodes")
    shapes = [("train", "train")] * (trains_on == "episodes") + [("eval", "val")]
    check_episodes_fit(cfg, dataset, shapes)  # readers with a file listing: before decoding
    inputs = dict(dataset.input_spec())
    algo = procs.prepare(build_algorithm(cfg, inputs, device))
    check_episodes_fit(cfg, dataset, shapes, decode=True)  # the others, once options passed
    config = OmegaConf.to_container(cfg, resolve=True)
    # init_from= (a new run only: a resume restores every weight from its own checkpoint)
    init_from = init_backbone(algo, cfg.init_from, config) \
        if cfg.get("init_from") and not cfg.get("resume") else None
    record_split(dataset, run_dir, write=procs.main, resuming=bool(cfg.get("resume")))
    train_tasks = training_data(cfg, dataset, algo, device, procs)
    val_batch = episodes_per_batch(device, e.batch)
    val_tasks = dataset.sampler("val", task_shape(e), val_batch, device, prefix="eval")
    optimizer, scheduler = build_optimizer(cfg, algo)
    parts = RunParts(dataset, algo, train_tasks, val_tasks, optimizer, scheduler, autocast,
                     inputs, init_from, () if cfg.get("resume") else steps_followers(cfg))
    return MetaTrainer(parts, train_settings(cfg, val_batch), config, device, run_dir, procs)


_READS_STEPS = re.compile(r"\$\{[^}]*\btrain\.steps\b")


def steps_followers(cfg: DictConfig) -> tuple[str, ...]:
    """The keys whose value ``cfg`` computes from ``train.steps`` (``${train.steps}`` in any
    interpolation, e.g. Reptile's ``algo.anneal_steps``): schedules fixed when a run starts,
    which a resume with another ``train.steps`` would leave at the old length."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}[{i}]")
        elif isinstance(node, str) and _READS_STEPS.search(node) and prefix != "train.steps":
            found.append(prefix)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return tuple(found)


def training_data(cfg: DictConfig, dataset: FewShotDataset, algo: MetaAlgorithm,
                  device: torch.device, procs: Processes) -> Any:
    """The training sampler: the data set's tasks (episodes), or, for an algorithm that trains
    on labelled minibatches (transfer baselines), ``train.batch_size`` images of the training
    split with their class, whose count then sizes the algorithm's head."""
    t = cfg.train
    if algo.trains_on == "batches":
        procs.check_meta_batch(t.batch_size, "train.batch_size")
        batches = dataset.batches("train", t.batch_size, device, seed=cfg.seed,
                                  augment=build_augment(cfg))
        algo.set_base_classes(batches.classes)
        return batches
    return dataset.sampler("train", task_shape(t), t.meta_batch, device, seed=cfg.seed,
                           augment=build_augment(cfg))


def concurrent_jobs() -> int:
    """How many fewshot processes this machine runs at once for the same command: torchrun's
    local ranks (``LOCAL_WORLD_SIZE``) times the workers of a joblib sweep (its ``n_jobs``;
    -1 is every core, -2 all but one, as joblib counts)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    jobs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        launcher = hydra.get("launcher") or {}
        if hydra.mode == RunMode.MULTIRUN and "joblib" in str(launcher.get("_target_", "")):
            n = int(launcher.get("n_jobs") or -1)
            jobs *= max(1, usable_cores() + 1 + n if n < 0 else n)
    return max(1, jobs)


def set_threads(choice: int | str, device: torch.device, algo: MetaAlgorithm,
                inputs: Mapping[str, Any], images: int) -> str:
    """Set torch's intra-op threads for ``device.threads`` (see
    ``engine.runtime.choose_threads``) and return the line that says how many and why.
    ``images``: how many images one step feeds the backbone (a training meta-batch, or an
    evaluation batch). An ``OMP_NUM_THREADS`` in the environment is kept under ``auto``."""
    if choice == "auto" and os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        return f"CPU threads: {threads} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    flops = 0.0
    network = getattr(getattr(algo, "module", algo), "backbone", None)
    if choice == "auto" and device.type == "cpu" and network is not None and \
            "image_size" in inputs:
        size = int(inputs["image_size"])
        example = torch.zeros(1, int(inputs["in_channels"]), size, size, device=device)
        flops = 3 * images * forward_flops(network, example)  # forward and about 2x backward
    threads, why = choose_threads(choice, device, concurrent_jobs(), flops)
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} ({why})"
