"""``fewshot eval ckpt=PATH``: rebuild the run from its checkpoint and test on fixed episodes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fewshot_cli.build import build_algorithm, build_dataset
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.metrics import evaluate_episodes, mean_ci95
from fewshot_cli.engine.runtime import autocast_for, episodes_per_batch, resolve_device
from fewshot_cli.files import atomic_write_text

log = logging.getLogger(__name__)


def run_config(stored: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The checkpoint's config with the non-null keys of this eval command laid over it."""
    run = OmegaConf.create(stored)
    for key, value in cfg.eval.items():
        if value is not None:
            run.eval[key] = value
    if cfg.dataset.root is not None:
        run.dataset.root = cfg.dataset.root
    if cfg.device is not None:
        run.device.type = cfg.device
    return run


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Accuracy ± 95% CI on ``eval.episodes`` fixed test episodes; merged into results.json."""
    ckpt = Path(cfg.ckpt).expanduser().resolve()
    state = load_checkpoint(ckpt)
    run = run_config(state["config"], cfg)
    device = resolve_device(run.device.type)
    autocast = autocast_for(device, run.device.precision)
    e = run.eval

    dataset = build_dataset(run)
    test_store = dataset.load("test")
    batch = episodes_per_batch(device, e.batch)
    protocol = {k: bool(e.get(k, False)) for k in ("within_group", "distinct_drawers")}
    sampler = EpisodeSampler(test_store, e.ways, e.shots, e.queries, batch, device,
                             split="test", prefix="eval", **protocol)
    algo = build_algorithm(run, test_store, device)
    algo.load_state_dict(state["model"])
    episodes = sampler.fixed(e.episodes, seed=e.seed)
    progress = lambda it: tqdm(it, total=-(-e.episodes // batch), desc="eval", unit="batch")
    mean, ci = mean_ci95(evaluate_episodes(algo, episodes, autocast, progress))

    result = {"accuracy": mean, "ci95": ci, "episodes": e.episodes, "ways": e.ways,
              "shots": e.shots, "queries": e.queries, "seed": e.seed, "split": "test",
              "step": state["step"], "algo": run.algo._target_.rsplit(".", 1)[-1],
              "dataset": run.dataset._target_.rsplit(".", 1)[-1], **protocol}
    # the within-group protocol is another figure: its own key beside the ordinary one
    shape = f"{e.ways}way-{e.shots}shot" + "".join(f"-{k}" for k, on in protocol.items() if on)
    results_path = ckpt.parent / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault(ckpt.name, {})[shape] = result
    atomic_write_text(json.dumps(results, indent=2) + "\n", results_path)
    how = "".join(f", {k.replace('_', ' ')}" for k, on in protocol.items() if on)
    print(f"{ckpt.name} (step {state['step']}): {e.ways}-way {e.shots}-shot{how} test accuracy "
          f"{100 * mean:.2f}% ± {100 * ci:.2f}% (95% CI, {e.episodes} episodes)")
    print(f"results written to {results_path}")
    return result
