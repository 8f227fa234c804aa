"""The meta-trainer: what one run holds (model, optimizer, task samplers, random states, best
score), and the four things the training loop asks of it: step, validate, save, restore."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fewshot_cli.build import (
    build_algorithm,
    build_augment,
    build_dataset,
    build_optimizer,
)
from fewshot_cli.data.splits import record_split
from fewshot_cli.engine.checkpoint import code_version, init_backbone, save_checkpoint
from fewshot_cli.engine.distributed import Processes
from fewshot_cli.engine.metrics import mean_ci95, score_tasks
from fewshot_cli.engine.runtime import autocast_for, episodes_per_batch
from fewshot_cli.errors import FewshotError


class MetaTrainer:
    """Everything a run needs, built from its config in the order that fails fastest: the data
    set's options, then the model (its options and the task shapes are checked before any image
    is decoded), then the task samplers, then the optimizer."""

    def __init__(self, cfg: DictConfig, device: torch.device, run_dir: Path,
                 procs: Processes | None = None) -> None:
        t, e = cfg.train, cfg.eval
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.procs = procs or Processes(device=device)
        self.procs.check_meta_batch(t.meta_batch)
        self.autocast = autocast_for(device, cfg.device.precision)
        self.dataset = build_dataset(cfg)
        self.inputs = dict(self.dataset.input_spec())  # kept in checkpoints for predict
        self.algo = self.procs.prepare(build_algorithm(cfg, self.inputs, device))
        # init_from= (a new run only: a resume restores every weight from its own checkpoint)
        self.init_from = init_backbone(self.algo, cfg.init_from,
                                       OmegaConf.to_container(cfg, resolve=True)) \
            if cfg.get("init_from") and not cfg.get("resume") else None
        # a leaking split is refused, the split written once, a resumed run checked against it
        record_split(self.dataset, run_dir, write=self.procs.main,
                     resuming=bool(cfg.get("resume")))
        self.train_tasks = self._training_data()
        self.val_tasks = self.dataset.sampler("val", e, episodes_per_batch(device, e.batch),
                                              device, prefix="eval")
        self.optimizer, self.scheduler = build_optimizer(cfg, self.algo)
        self.step = 0
        self.best = {"score": -math.inf, "ci95": math.nan, "step": 0}
        self.code = [code_version()]  # every version of the code that trained this run, in order
        # Seconds spent in training steps (validation and checkpoints not counted), on the clock
        # of train.budget_clock; kept in checkpoints, so train.max_minutes spans resumes.
        self.trained_seconds = 0.0
        self._clock = time.process_time if t.get("budget_clock") == "cpu" else time.perf_counter
        # The first step whose loss was not finite, kept on the device so that steps which do
        # not log never wait for it; -1 while every loss has been finite.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def _training_data(self) -> Any:
        """The training sampler: the data set's tasks (episodes), or, for an algorithm that
        trains on labelled minibatches (transfer baselines), ``train.batch_size`` images of the
        training split with their class, whose count then sizes the algorithm's head."""
        cfg, t = self.cfg, self.cfg.train
        if self.algo.trains_on == "batches":
            self.procs.check_meta_batch(t.batch_size, "train.batch_size")
            batches = self.dataset.batches("train", t.batch_size, self.device, seed=cfg.seed,
                                           augment=build_augment(cfg))
            self.algo.set_base_classes(batches.classes)
            return batches
        return self.dataset.sampler("train", t, t.meta_batch, self.device, seed=cfg.seed,
                                    augment=build_augment(cfg))

    @property
    def per_step(self) -> tuple[int, str]:
        """What one training step consumes, for the speed logged: (how many, of what)."""
        t = self.cfg.train
        return (t.batch_size, "images") if self.algo.trains_on == "batches" \
            else (t.meta_batch, "episodes")

    # ---- one meta-training step

    def train_step(self, step: int, stop: bool = False) -> dict[str, torch.Tensor]:
        """Sample a meta-batch, meta-update once on this process's share of its tasks; the
        step's metrics as device tensors. ``stop`` (a Ctrl-C here) travels with the gradients
        to the other processes of a torchrun job."""
        start = self._clock()
        self.algo.train()
        self.algo.set_step(step)
        tasks = self.procs.shard(self.train_tasks.sample())
        with self.autocast():
            loss, metrics = self.algo.meta_loss(tasks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.algo.parameters() if p.requires_grad]
        bad = self.procs.average_gradients(params, stop, ~torch.isfinite(loss.detach()))
        self._bad_step = torch.where(bad & (self._bad_step < 0),
                                     torch.full_like(self._bad_step, step + 1), self._bad_step)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = step + 1
        self.trained_seconds += self._clock() - start
        return metrics

    def out_of_time(self) -> bool:
        """Whether the training steps have spent ``train.max_minutes`` (rank 0's clock decides
        for every process of a torchrun job, so that all stop at the same step)."""
        limit = self.cfg.train.get("max_minutes")
        return limit is not None and bool(self.procs.broadcast(
            self.trained_seconds >= 60 * limit))

    def check_finite(self) -> None:
        """Stop (without saving) if a loss since the last check was NaN or infinite."""
        bad = int(self._bad_step)
        if bad >= 0:
            raise self.diverged("the training loss became NaN or infinite", bad)

    def diverged(self, what: str, step: int) -> FewshotError:
        kept = self.run_dir / "last.pt"
        return FewshotError(
            f"{what} at step {step}; stopped without saving, the last good checkpoint is "
            f"{kept if kept.exists() else 'none yet'}; lower train.lr or set train.grad_clip")

    # ---- validation on fixed tasks

    def validate(self, progress: Callable | None = None) -> tuple[float, float, bool]:
        """Mean ± 95% CI of the score on ``train.val_episodes`` fixed validation tasks, and
        whether it is a new best (remembered; the caller saves ``best.pt``)."""
        batch = episodes_per_batch(self.device, self.cfg.eval.batch)
        tasks = self.val_tasks.fixed(self.cfg.train.val_episodes, seed=self.cfg.eval.seed + 1)
        batches = -(-self.cfg.train.val_episodes // batch)
        mine = -(-(batches - self.procs.rank) // self.procs.world)  # every world-th batch
        scores = score_tasks(self.algo, self.procs.my_batches(tasks), self.autocast,
                             progress and (lambda it: progress(it, mine)))
        mean, ci = mean_ci95(self.procs.gather(scores))
        improved = mean > self.best["score"]
        if improved:
            self.best = {"score": mean, "ci95": ci, "step": self.step}
        return mean, ci, improved

    # ---- checkpoints

    def save(self, name: str) -> Path:
        """Write ``name`` (last.pt, best.pt) atomically; refuse non-finite weights. Under
        torchrun only rank 0 writes (every rank holds the same weights)."""
        if not all(torch.isfinite(p).all() for p in self.algo.parameters()):
            raise self.diverged("the weights became NaN or infinite", self.step)
        path = self.run_dir / name
        if not self.procs.main:
            return path
        save_checkpoint(path, {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "step": self.step,
            "model": self.algo.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "sampler": self.train_tasks.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None},
            "inputs": self.inputs,
            "code": self.code,
            "trained_seconds": self.trained_seconds,
            "init_from": self.init_from,
            "best": {"accuracy" if self.algo.score_name == "accuracy" else "score":
                     self.best["score"], "ci95": self.best["ci95"], "step": self.best["step"],
                     "metric": self.algo.score_name},
        })
        return path

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` (a checkpoint) stopped."""
        self.algo.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.train_tasks.generator.set_state(state["rng"]["sampler"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        best = state["best"]
        trained_by = list(state.get("code") or ["not recorded"])  # saved before it was kept
        now = code_version()
        self.code = trained_by if trained_by[-1] == now else [*trained_by, now]
        self.step = state["step"]
        self.trained_seconds = float(state.get("trained_seconds", 0.0))
        self.init_from = state.get("init_from")
        self.best = {"score": best.get("score", best.get("accuracy")), "ci95": best["ci95"],
                     "step": best["step"]}
