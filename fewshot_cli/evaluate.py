"""``fewshot eval ckpt=PATH``: rebuild the run from its checkpoint and test on fixed tasks."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fewshot_cli.algorithms.base import FewShotAlgorithm, MetaAlgorithm
from fewshot_cli.build import build_algorithm, build_dataset, task_shape
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.splits import check_split
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.metrics import score_tasks
from fewshot_cli.engine.runtime import (
    autocast_for,
    episodes_per_batch,
    pad_host_heap,
    resolve_device,
)
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import write_failure
from fewshot_cli.intervals import format_mean_ci, normal_ci95
from fewshot_cli.options import DEVICE_RULES, EVAL_RULES, check
from fewshot_cli.results import key_words, merge_result, protocol

log = logging.getLogger(__name__)
#: the inner-loop family's ``algo.batchnorm`` policy that gives each kind of query statistics
POLICIES = {"transductive": "task", "inductive": "support"}


def run_config(stored: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The checkpoint's config with this command's non-null ``eval.*`` keys, its device (by
    default ``auto``: a checkpoint trained on a GPU evaluates on a CPU) and, if given,
    ``dataset.root`` laid over it."""
    run = OmegaConf.create(stored)
    for key, value in cfg.eval.items():
        if value is not None:
            run.eval[key] = value
    if cfg.dataset.root is not None:
        run.dataset.root = cfg.dataset.root
    run.device = cfg.device
    return run


def load_model(run: DictConfig, state: dict[str, Any], ckpt: Path, device: torch.device,
               dataset: FewShotDataset | None = None) -> Any:
    """The checkpoint's algorithm with its trained weights, on ``device``, in evaluation mode;
    its input shape as stored at training time (or, for older checkpoints, from ``dataset``)."""
    inputs = state.get("inputs") or (dataset or build_dataset(run)).input_spec()
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
    check(run, {**EVAL_RULES, **DEVICE_RULES})
    device = resolve_device(run.device.type)
    autocast = autocast_for(device, run.device.precision)
    e = run.eval

    dataset = build_dataset(run)
    check_split(dataset, ckpt.parent)  # the test classes are the ones the run recorded
    algo = load_model(run, state, ckpt, device, dataset)
    own_statistics = query_statistics(algo)
    statistics = use_query_statistics(algo, e.get("query_statistics"))
    batch = episodes_per_batch(device, e.batch)
    tasks = dataset.sampler("test", task_shape(e), batch, device, prefix="eval")
    baselines: dict[str, list[torch.Tensor | None]] = {}

    def on_batch(batch_tasks: Any) -> None:  # a baseline that cannot run here scores None
        for name, scores in dataset.baselines(batch_tasks).items():
            baselines.setdefault(name, []).append(None if scores is None else scores.float().cpu())

    progress = lambda it: tqdm(it, total=-(-e.episodes // batch), desc="eval", unit="batch")
    scores = score_tasks(algo, tasks.fixed(e.episodes, seed=e.seed), autocast, progress,
                         on_batch)
    result = summary(run, state, algo.score_name, scores, baselines)
    plain = OmegaConf.to_container(run, resolve=True)
    result.update(query_statistics=statistics, model_query_statistics=own_statistics,
                  protocol=protocol(plain, statistics, ckpt.parent))
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
    lines = [f"{name} (step {step}): {shape} test {metric} "
             f"{shown(result[metric], result['ci95'])} (95% CI, {result['episodes']} episode"
             f"{'s' if result['episodes'] != 1 else ''}"
             f"{f', {statistics} query statistics' if statistics else ''})"]
    if result.get("baselines"):
        rows = [(result["algo"], result[metric], result["ci95"])] + [
            (n, *((b["mean"], b["ci95"]) if b else (None, None)))
            for n, b in result["baselines"].items()]
        width = max(len(r[0]) for r in rows)
        lines += ["", f"| {'method':<{width}} | {metric} ± 95% CI |",
                  f"|{'-' * (width + 2)}|---:|"]
        lines += [f"| {n:<{width}} | {shown(m, c)} |" for n, m, c in rows]
    return "\n".join(lines)
