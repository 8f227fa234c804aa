"""``fewshot train``: build the episodic pipeline and the algorithm, meta-train, validate, save."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fewshot_cli.algorithms.base import accuracy
from fewshot_cli.build import build_algorithm, build_augment, build_dataset, build_optimizer
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from fewshot_cli.engine.metrics import evaluate_episodes, mean_ci95
from fewshot_cli.engine.runtime import (
    StopRequest,
    autocast_for,
    episodes_per_batch,
    resolve_device,
)
from fewshot_cli.errors import FewshotError, Interrupted

log = logging.getLogger(__name__)


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """The stored config of ``cfg.resume`` with this command's ``key.sub=value`` overrides."""
    state = load_checkpoint(cfg.resume)
    groups = [o.split("=")[0] for o in overrides if "=" in o and "." not in o.split("=")[0]]
    changed = [g for g in groups if g not in ("resume", "seed")]
    if changed:
        raise FewshotError(f"cannot change {', '.join(changed)} when resuming; resume with the "
                           "stored choices or start a new run")
    stored = OmegaConf.create(state["config"])
    dotted = [o for o in overrides if "=" in o and "." in o.split("=")[0]]
    merged = OmegaConf.merge(stored, OmegaConf.from_dotlist(dotted))
    merged.resume = str(cfg.resume)
    return merged, state


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Meta-train as configured; writes TensorBoard events, ``last.pt`` and ``best.pt``."""
    state = None
    if cfg.resume:
        cfg, state = resume_config(cfg, overrides or [])
        run_dir = Path(cfg.resume).expanduser().resolve().parent
    device = resolve_device(cfg.device.type)
    autocast = autocast_for(device, cfg.device.precision)
    torch.manual_seed(cfg.seed)
    t, e = cfg.train, cfg.eval

    dataset = build_dataset(cfg)
    train_store, val_store = dataset.load("train"), dataset.load("val")
    dataset.record(run_dir)
    train_sampler = EpisodeSampler(train_store, t.ways, t.shots, t.queries, t.meta_batch, device,
                                   seed=cfg.seed, split="train", prefix="train",
                                   augment=build_augment(cfg))
    val_sampler = EpisodeSampler(val_store, e.ways, e.shots, e.queries,
                                 episodes_per_batch(device, e.batch), device, split="val",
                                 prefix="eval", within_group=e.get("within_group", False),
                                 distinct_drawers=e.get("distinct_drawers", False))
    algo = build_algorithm(cfg, train_store, device)
    optimizer, scheduler = build_optimizer(cfg, algo)

    start, best = 0, {"accuracy": -1.0, "ci95": float("nan"), "step": 0}
    if state is not None:
        algo.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        train_sampler.generator.set_state(state["rng"]["sampler"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start, best = state["step"], state["best"]
        log.info("resuming from step %d in %s", start, run_dir)

    def diverged(what: str, step: int) -> FewshotError:
        kept = run_dir / "last.pt"
        return FewshotError(
            f"{what} at step {step}; stopped without saving, the last good checkpoint is "
            f"{kept if kept.exists() else 'none yet'}; lower train.lr or set train.grad_clip")

    def checkpoint(name: str, step: int) -> Path:
        if not all(torch.isfinite(p).all() for p in algo.parameters()):
            raise diverged("the weights became NaN or infinite", step)
        path = run_dir / name
        save_checkpoint(path, {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "step": step,
            "model": algo.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "sampler": train_sampler.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
            "best": best,
        })
        return path

    def validate(step: int) -> tuple[float, float]:
        accs = evaluate_episodes(algo, val_sampler.fixed(t.val_episodes, seed=cfg.eval.seed + 1),
                                 autocast)
        return mean_ci95(accs)

    writer = SummaryWriter(str(run_dir), purge_step=start if start else None)
    log.info("run folder: %s", run_dir)
    bar = tqdm(initial=start, total=t.steps, desc="meta-train", unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)
    clock, last_log = time.perf_counter(), start
    stop = StopRequest()
    with stop.installed():
        for step in range(start, t.steps):
            if stop.requested:
                path = checkpoint("last.pt", step)
                raise Interrupted(f"interrupted at step {step}: saved {path}; continue with "
                                  f"fewshot train resume={path}")
            algo.train()
            if hasattr(algo, "set_step"):  # MAML++ annealing follows the meta-step
                algo.set_step(step)
            episode = train_sampler.sample()
            with autocast():
                loss, logits = algo.loss(episode)
            if not torch.isfinite(loss):
                raise diverged(f"the training loss became {loss.item()}", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(algo.parameters(), t.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            bar.update(1)
            done = step + 1

            if done % t.log_every == 0 or done == t.steps:
                now = time.perf_counter()
                speed = (done - last_log) * t.meta_batch / max(now - clock, 1e-9)
                clock, last_log = now, done
                acc = float(accuracy(logits.detach().float(), episode.query_y).mean())
                writer.add_scalar("train/loss", loss.item(), done)
                writer.add_scalar("train/accuracy", acc, done)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], done)
                writer.add_scalar("train/episodes_per_s", speed, done)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}",
                                eps=f"{speed:.0f}/s", refresh=False)

            if done % t.val_every == 0 or done == t.steps:
                mean, ci = validate(done)
                writer.add_scalar("val/accuracy", mean, done)
                writer.add_scalar("val/ci95", ci, done)
                if mean > best["accuracy"]:
                    best = {"accuracy": mean, "ci95": ci, "step": done}
                    checkpoint("best.pt", done)
                checkpoint("last.pt", done)
                log.info("step %d: val %d-way %d-shot accuracy %.2f%% ± %.2f%% (best %.2f%% at "
                         "step %d)", done, e.ways, e.shots, 100 * mean, 100 * ci,
                         100 * best["accuracy"], best["step"])
                clock = time.perf_counter()  # validation time is not training speed
    bar.close()
    hparams = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True)["train"].items()
               if isinstance(v, (int, float, str, bool))}
    hparams.update(algo=cfg.algo._target_.rsplit(".", 1)[-1], dataset=cfg.dataset._target_
                   .rsplit(".", 1)[-1], backbone=cfg.backbone._target_.rsplit(".", 1)[-1],
                   seed=cfg.seed)
    writer.add_hparams(hparams, {"hparam/best_val_accuracy": best["accuracy"]}, run_name=".")
    writer.close()
    log.info("done: best val accuracy %.2f%% ± %.2f%% at step %d; evaluate with: fewshot eval "
             "ckpt=%s", 100 * best["accuracy"], 100 * best["ci95"], best["step"],
             run_dir / "best.pt")
    return {"best": best, "run_dir": str(run_dir)}
