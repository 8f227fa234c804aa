"""``fewshot train``: build the episodic pipeline and the algorithm, meta-train, validate, save.

:func:`meta_train` is the whole training loop, top to bottom: one meta-update per step
(``MetaTrainer.train_step``: sample a meta-batch, meta-loss, backward, optimizer step), metrics
to TensorBoard every ``train.log_every`` steps, validation on fixed tasks and checkpoints every
``train.val_every`` steps, a clean stop on Ctrl-C, once the steps have spent
``train.max_minutes`` (validated and saved first), or when a validation hook (a search's pruner)
asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fewshot_cli.build import set_threads, wire_run
from fewshot_cli.engine.distributed import Processes
from fewshot_cli.engine.run_folder import RunFolder
from fewshot_cli.engine.runtime import (
    StopRequest,
    pad_host_heap,
    requeued_checkpoint,
    resolve_device,
)
from fewshot_cli.engine.trainer import MetaTrainer
from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError
from fewshot_cli.intervals import format_mean_ci
from fewshot_cli.options import check_train
from fewshot_cli.shell import arg, command

log = logging.getLogger(__name__)
HPARAM_SECTIONS = ("train", "algo", "backbone", "dataset", "device", "augment")
# Settings that mean nothing to some runs, left out of their hparams: the image task shape and
# augmentation to a bandit learner (RL²), the minibatch size to algorithms trained on episodes.
IMAGE_ONLY = ("train.ways", "train.shots", "train.queries", "train.batch_size", "augment")
BATCHES_ONLY = ("train.batch_size",)
# Called after each validation with (training step, validation score, whether it is the run's
# last); returns why the run should stop early (a search pruning a hopeless trial), or None.
ValidationHook = Callable[[int, float, bool], "str | None"]
STOPPED_EARLY = "stopped early at step %d of %d: %s"  # train.log's line; report.py reads it
OUT_OF_TIME = "train.max_minutes=%g of training spent (%s clock) at step %d of %d"


def train(cfg: DictConfig, run_dir: Path, hydra_files: dict[str, str] | None = None,
          state: dict[str, Any] | None = None,
          on_validation: ValidationHook | None = None) -> float:
    """Meta-train as configured in ``run_dir`` (continuing ``state``, a checkpoint, when
    given); returns the best validation score, which Hydra's sweepers optimise. Under
    ``torchrun`` every process runs this; rank 0 owns the folder and writes everything, and
    calls ``on_validation`` (see ValidationHook), whose answer every rank follows."""
    pad_host_heap()
    check_train(cfg)
    if state is None:
        state = requeued_state(cfg, run_dir)
    procs = Processes.start(resolve_device(cfg.device.type))
    try:
        run_dir = Path(procs.broadcast(str(run_dir)))
        if not procs.main:
            logging.getLogger().setLevel(logging.WARNING)
        folder = RunFolder(run_dir, hydra_files, resuming=state is not None) if procs.main \
            else contextlib.nullcontext()
        with folder:
            torch.manual_seed(cfg.seed)
            trainer = wire_run(cfg, procs.device, run_dir, procs)
            log.info(set_threads(cfg.device.get("threads", "auto"), procs.device,
                                 trainer.algo, trainer.inputs, step_images(cfg, trainer)))
            if state is not None:
                trainer.restore(state)
                log.info("resuming from step %d in %s", trainer.step, run_dir)
            if procs.world > 1:
                log.info("data-parallel over %d processes: %d tasks each per meta-batch",
                         procs.world, cfg.train.meta_batch // procs.world)
            return meta_train(trainer, on_validation)
    finally:
        procs.close()


def requeued_state(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to continue from when this job is a submitit/SLURM job requeued after a
    time limit or preemption saved ``run_dir/last.pt`` (runtime.StopRequest.leave), else None.

    Raises:
        FewshotError: that checkpoint holds another config than the requeued job's.
    """
    path = requeued_checkpoint(run_dir)
    if path is None:
        return None
    from omegaconf import OmegaConf

    from fewshot_cli.engine.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    mine = OmegaConf.to_container(cfg, resolve=True)
    differ = sorted(k for k in {*mine, *state["config"]} if mine.get(k) != state["config"].get(k))
    if differ:
        raise FewshotError(f"the requeued job cannot continue {path}: its {', '.join(differ)} "
                           "differ from the checkpoint's; give this run its own hydra.run.dir")
    log.info("requeued: continuing %s from step %d", path, state["step"])
    return state


def step_images(cfg: DictConfig, trainer: MetaTrainer) -> int:
    """Images one training step feeds the backbone (per process)."""
    t = cfg.train
    if getattr(trainer.algo, "trains_on", "episodes") == "batches":
        return int(t.batch_size) // trainer.procs.world
    per_task = int(t.ways) * (int(t.shots) + int(t.queries))
    return max(1, int(t.meta_batch) // trainer.procs.world) * per_task


def sweeper_hook(sweeper: DictConfig) -> ValidationHook | None:
    """The validation hook that the sweeper running this run offers, if its class has a
    ``validation_hook(sweeper_config)`` (``hydra/sweeper=fewshot_optuna`` does: it reports
    each validation to the run's Optuna trial and relays the pruner's verdict)."""
    from hydra.utils import get_class

    target = sweeper.get("_target_")
    make = getattr(get_class(target), "validation_hook", None) if target else None
    return make(sweeper) if make is not None else None


def _bar(**kwargs: Any) -> tqdm:
    """A progress bar on stderr; redrawn less often when stderr is a file (a SLURM log)."""
    return tqdm(dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0, **kwargs)


def meta_train(trainer: MetaTrainer, on_validation: ValidationHook | None = None) -> float:
    """The training loop; returns the best validation score."""
    run_dir, t, metric = trainer.run_dir, trainer.settings, trainer.algo.score_name
    if trainer.step >= t.steps:
        log.info("nothing to do: the run is already at step %d of train.steps=%d; resume with a "
                 "larger train.steps to continue", trainer.step, t.steps)
        return trainer.best["score"]
    if trainer.out_of_time():
        log.info("nothing to do: the run has spent train.max_minutes=%g at step %d; resume with "
                 "a larger train.max_minutes to continue", t.max_minutes, trainer.step)
        return trainer.best["score"]
    main = trainer.procs.main
    writer = SummaryWriter(str(run_dir), purge_step=trainer.step or None) if main else None
    try:
        summaries = write_hparams(writer, trainer) if writer is not None else None
        stopped = _loop(trainer, writer, on_validation)
        if writer is not None:
            writer.file_writer.add_summary(summaries[2], trainer.step)  # the session's end
    except BaseException:
        with contextlib.suppress(Exception):  # (a full disk) must not hide why the run stopped
            writer and writer.close()
        raise
    if writer is not None:
        writer.close()
    best = trainer.best
    log.info("%s: best val %s %s at step %d; evaluate with: %s",
             "stopped" if stopped else "done", metric,
             format_mean_ci(best["score"], best["ci95"], metric), best["step"],
             command("eval", arg("ckpt", run_dir / "best.pt")))
    return best["score"]


def _loop(trainer: MetaTrainer, writer: SummaryWriter | None,
          on_validation: ValidationHook | None) -> str | None:
    """Steps from ``trainer.step`` to ``train.steps``: update, log, validate, save; returns why
    ``on_validation`` stopped it early, or None. ``writer`` is None on the ranks of a torchrun
    job other than 0."""
    run_dir, procs = trainer.run_dir, trainer.procs
    t, metric = trainer.settings, trainer.algo.score_name
    log.info("run folder: %s", run_dir)
    stop = StopRequest()
    scalars = lambda values, step: writer and [writer.add_scalar(k, v, step)
                                               for k, v in values.items()]
    # On a terminal only: a nested bar in a log file would be cursor-movement codes.
    validation_bar = lambda total: _bar(total=total, desc="validate", unit="episode",
                                        leave=False, disable=None if procs.main else True)
    with stop.installed(), logging_redirect_tqdm(), _bar(
            initial=trainer.step, total=t.steps, desc="meta-train", unit="step",
            disable=not procs.main) as bar:
        clock, last_log = time.perf_counter(), trainer.step
        for step in range(trainer.step, t.steps):
            if procs.stop_agreed(stop.requested):
                trainer.check_finite()
                path = trainer.save("last.pt")
                procs.barrier()  # no rank exits (and lets torchrun stop rank 0) mid-save
                stop.leave(step, path, command("train", arg("resume", path)))
            metrics = trainer.train_step(step, stop.requested)
            bar.update(1)
            done = step + 1
            out_of_time = trainer.out_of_time()  # validate and save as at the end, then stop

            if done % t.log_every == 0 or done == t.steps:
                trainer.check_finite()
                now = time.perf_counter()
                count, unit = trainer.per_step
                speed = (done - last_log) * count / max(now - clock, 1e-9)
                clock, last_log = now, done
                values = {name: float(value) for name, value in metrics.items()}
                scalars({**{f"train/{k}": v for k, v in values.items()},
                         "train/lr": trainer.optimizer.param_groups[0]["lr"],
                         f"train/{unit}_per_s": speed}, done)
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in values.items()},
                                 unit: f"{speed:.0f}/s"}, refresh=False)  # episodes=18/s

            if done % t.val_every == 0 or done == t.steps or out_of_time:
                trainer.check_finite()
                if not sys.stderr.isatty():  # no validation bar in a log file: say why it waits
                    log.info("step %d: validating on %d fixed episodes", done, t.val_episodes)
                mean, ci, improved = trainer.validate(validation_bar)
                scalars({f"val/{metric}": mean, "val/ci95": ci}, done)
                if improved:
                    trainer.save("best.pt")
                    scalars({f"hparam/best_val_{metric}": trainer.best["score"]}, done)
                trainer.save("last.pt")
                best = trainer.best
                log.info("step %d: val %s %s (best %s at step %d)", done, metric,
                         format_mean_ci(mean, ci, metric),
                         format_mean_ci(best["score"], best["ci95"], metric), best["step"])
                if on_validation is not None:
                    last = done == t.steps
                    reason = procs.broadcast(on_validation(done, mean, last) if procs.main
                                             else None)
                    if reason and not last:  # last.pt is saved: stop as after a Ctrl-C
                        log.info(STOPPED_EARLY, done, t.steps, reason)
                        return reason
                if out_of_time and done < t.steps:
                    log.info(OUT_OF_TIME, t.max_minutes, t.budget_clock, done, t.steps)
                    return "out of time"
                clock = time.perf_counter()  # validation time is not training speed
    return None


def _flat(node: Mapping, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name))
        elif value is not None:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def hparams(plain: Mapping[str, Any], task_kind: str = IMAGE_TASKS,
            trains_on: str = "episodes") -> dict[str, Any]:
    """The run's settings for TensorBoard's HPARAMS tab, from its config as plain data: every
    option of the groups, by key (``algo.inner_lr``), and the group options chosen
    (``algo=metasgd``); only those that apply to an algorithm learning ``task_kind`` tasks
    from ``trains_on`` (its class attributes): no ``train.ways`` for RL² on bandits."""
    values: dict[str, Any] = {"seed": plain["seed"]}
    for section in HPARAM_SECTIONS:
        if isinstance(plain.get(section), Mapping):
            values.update(_flat(plain[section], section))
    values.update({k: v for k, v in (plain.get("choices") or {}).items() if v is not None})
    left_out = (IMAGE_ONLY if task_kind != IMAGE_TASKS else ()) + \
        (BATCHES_ONLY if trains_on != "batches" else ())
    return {k: v for k, v in values.items()
            if not any(k == key or k.startswith(f"{key}.") for key in left_out)}


def write_hparams(writer: SummaryWriter, trainer: MetaTrainer) -> tuple[Any, Any, Any]:
    """Write the run's hparams (:func:`hparams`) into its TensorBoard events as it starts, so a
    run stopped early or interrupted has them too; the metric, ``hparam/best_val_<metric>``,
    is written at each validation that improves on the best. Returns TensorBoard's three
    summaries (experiment, session start, session end), the last to write when the run ends."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    algo, metric = trainer.algo, trainer.algo.score_name
    summaries = hparams_summaries(hparams(trainer.config, algo.task_kind, algo.trains_on),
                                  {f"hparam/best_val_{metric}": trainer.best["score"]})
    for summary in summaries[:2]:
        writer.file_writer.add_summary(summary, trainer.step)
    if math.isfinite(trainer.best["score"]):  # resumed: the best so far, after the purge
        writer.add_scalar(f"hparam/best_val_{metric}", trainer.best["score"], trainer.step)
    writer.flush()
    return summaries
