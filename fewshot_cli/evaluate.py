"""``fewshot eval ckpt=PATH``: rebuild the run from its checkpoint and test on fixed tasks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fewshot_cli.build import build_algorithm, build_dataset
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.splits import check_split
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.metrics import mean_ci95, score_tasks
from fewshot_cli.engine.runtime import (
    autocast_for,
    episodes_per_batch,
    pad_host_heap,
    resolve_device,
)
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_write_text
from fewshot_cli.options import DEVICE_RULES, EVAL_RULES, check

log = logging.getLogger(__name__)


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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ± 95% CI on ``eval.episodes`` fixed test tasks (and, where the data set has them,
    its classical baselines on the same tasks); merged into the run's results.json."""
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
    batch = episodes_per_batch(device, e.batch)
    tasks = dataset.sampler("test", e, batch, device, prefix="eval")
    baselines: dict[str, list[torch.Tensor | None]] = {}

    def on_batch(batch_tasks: Any) -> None:  # a baseline that cannot run here scores None
        for name, scores in dataset.baselines(batch_tasks).items():
            baselines.setdefault(name, []).append(None if scores is None else scores.float().cpu())

    progress = lambda it: tqdm(it, total=-(-e.episodes // batch), desc="eval", unit="batch")
    scores = score_tasks(algo, tasks.fixed(e.episodes, seed=e.seed), autocast, progress,
                         on_batch)
    result = summary(run, state, algo.score_name, scores, baselines)
    shape = dataset.describe(e)
    results_path = write_result(ckpt, f"{shape}, {e.episodes} episodes, seed {e.seed}", result)
    print(report(ckpt.name, state["step"], shape, result))
    print(f"results written to {results_path}")
    return result


def _stats(scores: torch.Tensor) -> dict[str, Any]:
    mean, ci = mean_ci95(scores)
    return {"mean": mean, "ci95": None if ci != ci else ci}  # JSON has no NaN: null


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
    """Merge ``result`` into ``results.json`` beside the checkpoint, atomically; an entry is
    replaced only by one with the same checkpoint, task shape, episode count and seed."""
    path = ckpt.parent / "results.json"
    results: dict[str, Any] = {}
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            raise FewshotError(f"{path} is not readable JSON, so the new result was not added; "
                               "move the file away and evaluate again") from None
    results.setdefault(ckpt.name, {})[key] = result
    atomic_write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", path)
    return path


def report(name: str, step: int, shape: str, result: dict[str, Any]) -> str:
    """The lines ``fewshot eval`` prints: the score ± CI, then any baselines as a table (one
    that could not run shows "—")."""
    metric = result["metric"]
    percent = metric == "accuracy"

    def shown(mean: float | None, ci: float | None) -> str:
        if mean is None:
            return "—"
        scale, unit = (100, "%") if percent else (1, "")
        half = f"{scale * ci:.2f}{unit}" if ci is not None else "n/a (one episode)"
        return f"{scale * mean:.2f}{unit} ± {half}"

    lines = [f"{name} (step {step}): {shape} test {metric} "
             f"{shown(result[metric], result['ci95'])} (95% CI, {result['episodes']} episode"
             f"{'s' if result['episodes'] != 1 else ''})"]
    if result.get("baselines"):
        rows = [(result["algo"], result[metric], result["ci95"])] + [
            (n, *((b["mean"], b["ci95"]) if b else (None, None)))
            for n, b in result["baselines"].items()]
        width = max(len(r[0]) for r in rows)
        lines += ["", f"| {'method':<{width}} | {metric} ± 95% CI |",
                  f"|{'-' * (width + 2)}|---:|"]
        lines += [f"| {n:<{width}} | {shown(m, c)} |" for n, m, c in rows]
    return "\n".join(lines)
