"""The meta-trainer: what one run holds (model, optimizer, task samplers, random states, best
score), and the four things the training loop asks of it: step, validate, save, restore.

It takes objects and a typed settings record, never the config: ``build.wire_run`` builds them
from the config (in the order that fails fastest) and passes the config along as plain data,
which the checkpoints store."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.algorithms.base import MetaAlgorithm
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.draws import task_seeds
from fewshot_cli.engine.checkpoint import code_version, save_checkpoint
from fewshot_cli.engine.distributed import Processes
from fewshot_cli.engine.metrics import score_tasks
from fewshot_cli.errors import FewshotError
from fewshot_cli.intervals import normal_ci95


@dataclass(frozen=True)
class TrainSettings:
    """The plain values of a run's loop (``train.*``, ``eval.*``, ``seed``): ``steps``
    meta-updates of ``meta_batch`` tasks, metrics every ``log_every`` steps, validation on
    ``val_episodes`` fixed tasks (``val_batch`` at a time, seeded by ``val_seed``) every
    ``val_every`` steps, gradients clipped to norm ``grad_clip`` (None: not clipped)."""

    steps: int
    meta_batch: int
    log_every: int
    val_every: int
    val_episodes: int
    val_batch: int
    val_seed: int
    seed: int
    grad_clip: float | None = None
    batch_size: int | None = None    # images per step of a minibatch-trained algorithm
    max_minutes: float | None = None  # stop once the training steps have spent this long
    budget_clock: str = "wall"        # wall | cpu: the clock max_minutes is measured on


def seeded(tasks: Any, seed: int, step: int, device: torch.device | str = "cpu") -> Any:
    """``tasks`` with the seeds of the random draws of training step ``step`` of a run seeded
    ``seed``, one per task (or image) of the global meta-batch, given before it is split over
    ranks (see ``fewshot_cli.draws``); tasks that carry their own randomness (bandit trials)
    are returned as they are."""
    if "seeds" not in {f.name for f in dataclasses.fields(tasks)}:
        return tasks
    count = next(v.shape[0] for v in vars(tasks).values() if isinstance(v, torch.Tensor))
    return dataclasses.replace(tasks, seeds=task_seeds(seed, step, count, device))


@dataclass
class RunParts:
    """The objects a run trains with, built by ``build.wire_run``: the data set, the algorithm
    (on its device; wrapped for data parallelism under torchrun), the training and validation
    task samplers (labelled minibatches for a transfer baseline), the optimizer and its
    schedule, the mixed-precision context, the input shape the model was sized for (kept in
    checkpoints for ``fewshot predict``), the record of ``init_from=`` (kept in checkpoints), and
    the keys the config computed from ``train.steps`` when the run started (kept in checkpoints:
    a resume may not change ``train.steps`` under them)."""

    dataset: FewShotDataset
    algo: MetaAlgorithm
    train_tasks: Any
    val_tasks: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    autocast: Callable
    inputs: dict[str, Any]
    init_from: dict[str, Any] | None = None  # the pretrained backbone a new run started from
    follows_steps: tuple[str, ...] = ()


class MetaTrainer:
    """A run's state and its steps, over the objects of ``parts`` and the values of
    ``settings``; ``config`` (plain data) is what its checkpoints record."""

    def __init__(self, parts: RunParts, settings: TrainSettings, config: dict[str, Any],
                 device: torch.device, run_dir: Path, procs: Processes) -> None:
        self.settings, self.config = settings, config
        self.device, self.run_dir, self.procs = device, run_dir, procs
        self.dataset, self.algo, self.inputs = parts.dataset, parts.algo, parts.inputs
        self.train_tasks, self.val_tasks = parts.train_tasks, parts.val_tasks
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.autocast, self.init_from = parts.autocast, parts.init_from
        self.follows_steps = parts.follows_steps
        self.step = 0
        self.best = {"score": -math.inf, "ci95": math.nan, "step": 0}
        self.code = [code_version()]  # every version of the code that trained this run, in order
        # Seconds spent in training steps (validation and checkpoints not counted), on the clock
        # of train.budget_clock; kept in checkpoints, so train.max_minutes spans resumes.
        self.trained_seconds = 0.0
        # Wall seconds of the whole training (steps, validation, checkpoints) over every command
        # that trained the run, for reproduction records; None once a checkpoint that did not
        # record it was resumed.
        self._wall_before: float | None = 0.0
        self._wall_start = time.perf_counter()
        self._clock = time.process_time if settings.budget_clock == "cpu" else time.perf_counter
        # The first step whose loss was not finite, kept on the device so that steps which do
        # not log never wait for it; -1 while every loss has been finite.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)

    @property
    def per_step(self) -> tuple[int, str]:
        """What one training step consumes, for the speed logged: (how many, of what)."""
        return (self.settings.batch_size, "images") if self.algo.trains_on == "batches" \
            else (self.settings.meta_batch, "episodes")

    # ---- one meta-training step

    def train_step(self, step: int, stop: bool = False) -> dict[str, torch.Tensor]:
        """Sample a meta-batch, meta-update once on this process's share of its tasks; the
        step's metrics as device tensors. ``stop`` (a Ctrl-C here) travels with the gradients
        to the other processes of a torchrun job."""
        start = self._clock()
        self.algo.train()
        self.algo.set_step(step)
        tasks = self.procs.shard(seeded(self.train_tasks.sample(), self.settings.seed, step,
                                        self.device))
        with self.autocast():
            loss, metrics = self.algo.meta_loss(tasks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.algo.parameters() if p.requires_grad]
        bad = self.procs.average_gradients(params, stop, ~torch.isfinite(loss.detach()))
        self._bad_step = torch.where(bad & (self._bad_step < 0),
                                     torch.full_like(self._bad_step, step + 1), self._bad_step)
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = step + 1
        self.trained_seconds += self._clock() - start
        return metrics

    @property
    def wall_seconds(self) -> float | None:
        """Wall seconds this run has trained for, resumes included (None: not recorded)."""
        if self._wall_before is None:
            return None
        return self._wall_before + time.perf_counter() - self._wall_start

    def out_of_time(self) -> bool:
        """Whether the training steps have spent ``train.max_minutes`` (rank 0's clock decides
        for every process of a torchrun job, so that all stop at the same step)."""
        limit = self.settings.max_minutes
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

    def validate(self, progress: Callable[[int], Any] | None = None
                 ) -> tuple[float, float, bool]:
        """Mean ± 95% CI of the score on ``train.val_episodes`` fixed validation tasks, and
        whether it is a new best (remembered; the caller saves ``best.pt``). ``progress(n)``
        makes a progress bar (a context manager with ``update``) for this process's n tasks."""
        episodes, batch = self.settings.val_episodes, self.settings.val_batch
        tasks = self.val_tasks.fixed(episodes, seed=self.settings.val_seed)
        sizes = [min(batch, episodes - start) for start in range(0, episodes, batch)]
        mine = sum(sizes[self.procs.rank::self.procs.world])  # every world-th batch
        with progress(mine) if progress else contextlib.nullcontext() as bar:
            scores = score_tasks(self.algo, self.procs.my_batches(tasks), self.autocast,
                                 bar.update if bar is not None else None)
        mean, ci = normal_ci95(self.procs.gather(scores))
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
            "config": self.config,
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
            "wall_seconds": self.wall_seconds,
            "init_from": self.init_from,
            "follows_steps": list(self.follows_steps),
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
        self._wall_before = state.get("wall_seconds", None if self.step else 0.0)
        self._wall_start = time.perf_counter()
        self.init_from = state.get("init_from")
        self.follows_steps = tuple(state.get("follows_steps", ()))
        self.best = {"score": best.get("score", best.get("accuracy")), "ci95": best["ci95"],
                     "step": best["step"]}
