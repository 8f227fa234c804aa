"""``fewshot eval ckpt=PATH``: rebuild the run from its checkpoint and test on fixed tasks, on
the data set it was trained on or, with ``dataset=<option>``, on another one's test split
(cross-domain, as Chen et al. 2019 test miniImageNet models on CUB)."""

from __future__ import annotations

import logging
import math
from inspect import signature
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fewshot_cli.algorithms.base import FewShotAlgorithm, MetaAlgorithm
from fewshot_cli.backbones import restoring
from fewshot_cli.build import (
    _options,
    build_algorithm,
    build_dataset,
    set_threads,
    task_kind,
    task_shape,
)
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.cross_domain import ModelInput
from fewshot_cli.data.splits import check_split, check_unseen, fingerprints
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.metrics import score_tasks
from fewshot_cli.engine.runtime import (
    autocast_for,
    episodes_per_batch,
    pad_host_heap,
    resolve_device,
)
from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import write_failure
from fewshot_cli.intervals import format_mean_ci, normal_ci95
from fewshot_cli.options import (
    DEVICE_RULES,
    EVAL_RULES,
    WHOLE_RULES,
    check,
    check_fixed_tasks,
)
from fewshot_cli.results import dataset_name, device_words, key_words, merge_result, protocol

log = logging.getLogger(__name__)
#: the inner-loop family's ``algo.batchnorm`` policy that gives each kind of query statistics
POLICIES = {"transductive": "task", "inductive": "support"}


def run_config(stored: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The checkpoint's config with this command's non-null ``eval.*`` keys, its device (by
    default ``auto``: a checkpoint trained on a GPU evaluates on a CPU) and, if given,
    ``dataset.root`` laid over it; with a ``dataset=`` choice, that data set instead
    (:func:`other_dataset`)."""
    run = OmegaConf.create(stored)
    for key, value in cfg.eval.items():
        if value is not None:
            run.eval[key] = value
    if "_target_" in cfg.dataset:
        run.dataset = cfg.dataset
        if run.dataset.root is None and "root" not in signature(
                get_class(run.dataset._target_)).parameters:
            del run.dataset["root"]  # this command's own key, for readers of files
        run.choices = {**(run.get("choices") or {}), "dataset": chosen_dataset(cfg)}
    elif cfg.dataset.root is not None:
        run.dataset.root = cfg.dataset.root
    run.device = cfg.device
    return run


def chosen_dataset(cfg: DictConfig) -> str:
    """The ``dataset=`` option this command was given (its class name outside Hydra's app)."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("dataset") if HydraConfig.initialized() \
        else None
    return choice or str(cfg.dataset._target_).rsplit(".", 1)[-1].lower()


def other_dataset(run: DictConfig, state: dict[str, Any]) -> ModelInput:
    """The data set of ``run`` (another than the checkpoint's) as the checkpoint's model reads
    it: decoded at the model's image size, channels converted (see data.cross_domain). One
    sentence for a model of bandit tasks, or a data set of another kind of task than the
    model's."""
    stored = OmegaConf.create(state["config"])
    name, model = dataset_name(run), dataset_name(stored)
    kind, wanted = task_kind(run.dataset._target_), task_kind(stored.algo._target_)
    if wanted != IMAGE_TASKS:
        raise FewshotError(f"dataset={name}: cross-domain tests are for few-shot image "
                           f"classifiers, but this checkpoint's model (trained on "
                           f"dataset={model}) solves {wanted} tasks; evaluate it without dataset=")
    if kind != wanted:
        raise FewshotError(f"dataset={name} holds {kind} tasks, but this checkpoint's model "
                           f"(trained on dataset={model}) classifies images; test it on "
                           f"{_options('dataset', wanted)}")
    inputs = state.get("inputs") or build_dataset(stored).input_spec()
    if "image_size" in run.dataset:  # the reader decodes at the model's size itself
        run.dataset.image_size = inputs["image_size"]
    log.info("cross-domain test of a model trained on dataset=%s: dataset=%s's test split at "
             "the model's input, %d px, %d channel(s)", model, name, inputs["image_size"],
             inputs["in_channels"])
    return ModelInput(build_dataset(run), **inputs)


def enough_classes(dataset: FewShotDataset, name: str, ways: int, fixed: bool) -> None:
    """One sentence when the test split of the cross-domain data set ``name`` holds fewer
    classes than ``ways``, the task's (for a model with a ``fixed`` number of outputs, the
    only one it can classify)."""
    classes = dataset.load("test").num_classes
    if classes >= ways:
        return
    fix = f"this model's head classifies exactly {ways} classes, so test it on a data set " \
        f"with at least {ways} test classes" if fixed else \
        f"lower eval.ways to at most {classes}, or test on a data set with more test classes"
    raise FewshotError(f"dataset={name}'s test split holds {classes} classes, fewer than "
                       f"eval.ways={ways}; {fix}")


def load_model(run: DictConfig, state: dict[str, Any], ckpt: Path, device: torch.device,
               dataset: FewShotDataset | None = None) -> Any:
    """The checkpoint's algorithm with its trained weights, on ``device``, in evaluation mode;
    its input shape as stored at training time (or, for older checkpoints, from ``dataset``)."""
    inputs = state.get("inputs") or (dataset or build_dataset(run)).input_spec()
    with restoring():  # the checkpoint holds every weight: no pretrained file is read
        algo = build_algorithm(run, inputs, device)
    try:
        algo.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise FewshotError(f"the weights in {ckpt} do not fit the model its config describes "
                           f"({str(err).splitlines()[0][:120]}); the file was edited or written "
                           "by another version of fewshot") from None
    return algo.eval()


def batch_statistics(algo: torch.nn.Module) -> list[str]:
    """The BatchNorm layers of ``algo`` that normalise with the statistics of the batch they
    are given even in evaluation mode (``track_running_stats=False``): where a score then
    depends on the other images of the batch."""
    return [name for name, m in algo.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and (m.training or not m.track_running_stats or m.running_mean is None)]


def query_statistics(algo: MetaAlgorithm) -> str | None:
    """How a query's score depends on the other queries tested with it: "inductive" (not at
    all: running statistics, or the support set's), "transductive" (BatchNorm statistics of
    its own query batch: the MAML family's ``algo.batchnorm=task``, as in Finn et al. 2017;
    or BatchNorm without running statistics), None for tasks without queries (RL²)."""
    if not isinstance(algo, FewShotAlgorithm):
        return None
    policy = getattr(algo, "batchnorm", None)  # the inner-loop family's BatchNorm policy
    return "transductive" if policy == "task" or batch_statistics(algo) else "inductive"


def use_query_statistics(algo: MetaAlgorithm, wanted: str | None) -> str | None:
    """Switch ``algo`` to the query statistics ``wanted`` (None: keep its own) and return
    those it now uses. Only the inner-loop family's BatchNorm policy can switch (``task``:
    transductive, ``support``: inductive); raises a FewshotError naming
    ``eval.query_statistics`` for any other model asked to change."""
    own = query_statistics(algo)
    if wanted is None or wanted == own:
        return own
    if own is None:
        raise FewshotError(f"eval.query_statistics={wanted} applies to few-shot image "
                           f"classifiers, but this model scores {algo.score_name}; drop the key")
    if getattr(algo, "batchnorm", None) in POLICIES.values() and not batch_statistics(algo):
        algo.batchnorm = POLICIES[wanted]
        return wanted
    if wanted == "inductive":
        raise FewshotError("eval.query_statistics=inductive: this model's BatchNorm keeps no "
                           "running statistics (backbone.track_running_stats=false), so a task's "
                           "queries are scored together; fewshot predict scores each query alone "
                           "with the support set; drop the key to evaluate as trained")
    raise FewshotError("eval.query_statistics=transductive: this model normalises with the "
                       "BatchNorm statistics learned in training and has no per-batch statistics "
                       "to switch to; drop the key")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ± 95% CI on ``eval.episodes`` fixed test tasks (and, where the data set has them,
    its classical baselines on the same tasks). The figure is printed first, then merged into
    the run's results.json under its full protocol; returns the result entry.

    Raises FewshotError for a bad checkpoint or option, and (after printing the figure) where
    results.json cannot be written."""
    if not cfg.get("ckpt"):
        raise FewshotError("fewshot eval needs ckpt=PATH, the best.pt or last.pt of a run "
                           "(fewshot train prints it when it ends)")
    pad_host_heap()
    ckpt = Path(cfg.ckpt).expanduser().resolve()
    state = load_checkpoint(ckpt)
    run = run_config(state["config"], cfg)
    check(run, {**EVAL_RULES, **DEVICE_RULES, **WHOLE_RULES})
    check_fixed_tasks(run, ("eval.episodes",))
    device = resolve_device(run.device.type)
    autocast = autocast_for(device, run.device.precision)
    e = run.eval

    cross = "_target_" in cfg.dataset  # another data set: its classes differ by design
    if cross:
        dataset = other_dataset(run, state)
        check_unseen(dataset, ckpt.parent, dataset_name(run))  # not its own training classes
    else:
        dataset = build_dataset(run)
        check_split(dataset, ckpt.parent)  # the test classes are the ones the run recorded
    algo = load_model(run, state, ckpt, device, dataset)
    if cross and isinstance(algo, FewShotAlgorithm):
        enough_classes(dataset, dataset_name(run), e.ways, algo.fixed_ways)
    own_statistics = query_statistics(algo)
    statistics = use_query_statistics(algo, e.get("query_statistics"))
    batch = episodes_per_batch(device, e.batch)
    if isinstance(algo, FewShotAlgorithm):
        images = batch * e.ways * (e.shots + e.queries)
        log.info(set_threads(run.device.get("threads", "auto"), device, algo,
                             state.get("inputs") or {}, images))
    tasks = dataset.sampler("test", task_shape(e), batch, device, prefix="eval")
    baselines: dict[str, list[torch.Tensor | None]] = {}

    def on_batch(batch_tasks: Any) -> None:  # a baseline that cannot run here scores None
        for name, scores in dataset.baselines(batch_tasks).items():
            baselines.setdefault(name, []).append(None if scores is None else scores.float().cpu())

    with tqdm(total=e.episodes, desc="eval", unit="episode") as bar:
        scores = score_tasks(algo, tasks.fixed(e.episodes, seed=e.seed), autocast, bar.update,
                             on_batch)
    result = summary(run, state, algo.score_name, scores, baselines)
    plain = OmegaConf.to_container(run, resolve=True)
    tested = fingerprints(dataset.load("test")) if cross else None
    record = protocol(plain, statistics, ckpt.parent, tested, plain["device"])
    result.update(query_statistics=statistics, model_query_statistics=own_statistics,
                  protocol=record)
    if cross and record != protocol(state["config"], statistics, ckpt.parent,
                                    device=plain["device"]):
        result["trained_on"] = dataset_name(state["config"])  # not the run's own test
    shape = dataset.describe(task_shape(e))
    print(report(ckpt.name, state["step"], shape, result))  # first: the figure is never lost
    print(f"results written to {write_result(ckpt, key_words(shape, result), result)}")
    return result


def _stats(scores: torch.Tensor) -> dict[str, Any]:
    mean, ci = normal_ci95(scores)
    finite = lambda x: x if math.isfinite(x) else None  # JSON has no NaN: null
    return {"mean": finite(mean), "ci95": finite(ci)}


def summary(run: DictConfig, state: dict[str, Any], metric: str, scores: torch.Tensor,
            baselines: dict[str, list[torch.Tensor | None]]) -> dict[str, Any]:
    """The result entry: the score, its CI, the settings that produced it, the baselines."""
    stats = _stats(scores)
    choices = run.get("choices") or {}
    result = {"metric": metric, metric: stats["mean"], "ci95": stats["ci95"],
              **{k: v for k, v in OmegaConf.to_container(run.eval).items() if k != "batch"},
              "split": "test", "step": state["step"],
              "algo": choices.get("algo") or run.algo._target_.rsplit(".", 1)[-1],
              "dataset": choices.get("dataset") or run.dataset._target_.rsplit(".", 1)[-1]}
    if baselines:
        result["baselines"] = {
            name: None if any(p is None for p in parts) else _stats(torch.cat(parts))
            for name, parts in baselines.items()}
    return result


def write_result(ckpt: Path, key: str, result: dict[str, Any]) -> Path:
    """Merge ``result`` into ``results.json`` beside the checkpoint, under a lock (concurrent
    evaluations all keep theirs), replacing only the entry of the same checkpoint and
    protocol. A results.json that cannot be merged into is moved aside (one warning says
    where) and a fresh one holds ``result``. Raises a FewshotError where the folder cannot be
    written."""
    path = ckpt.parent / "results.json"
    try:
        moved = merge_result(path, ckpt.name, key, result)
    except OSError as err:
        raise write_failure(path, err, "the figure above was not saved") from None
    if moved is not None:
        log.warning("%s could not be merged into (%s): moved it to %s and started a fresh "
                    "one with this result", path, moved.reason, moved.to.name)
    return path


def report(name: str, step: int, shape: str, result: dict[str, Any]) -> str:
    """The lines ``fewshot eval`` prints: the score ± CI, then any baselines as a table (one
    that could not run shows "—")."""
    metric = result["metric"]

    def shown(mean: float | None, ci: float | None) -> str:
        return format_mean_ci(mean, ci, metric, alone=" ± n/a (one episode)")

    statistics = result.get("query_statistics")
    where = f"{result['dataset']} test (cross-domain: trained on {result['trained_on']})" \
        if result.get("trained_on") else "test"
    lines = [f"{name} (step {step}): {shape} {where} {metric} "
             f"{shown(result[metric], result['ci95'])} (95% CI, {result['episodes']} episode"
             f"{'s' if result['episodes'] != 1 else ''}"
             f"{f', {statistics} query statistics' if statistics else ''}"
             f"{device_words(result)})"]
    if result.get("baselines"):
        rows = [(result["algo"], result[metric], result["ci95"])] + [
            (n, *((b["mean"], b["ci95"]) if b else (None, None)))
            for n, b in result["baselines"].items()]
        width = max(len(r[0]) for r in rows)
        lines += ["", f"| {'method':<{width}} | {metric} ± 95% CI |",
                  f"|{'-' * (width + 2)}|---:|"]
        lines += [f"| {n:<{width}} | {shown(m, c)} |" for n, m, c in rows]
    return "\n".join(lines)
