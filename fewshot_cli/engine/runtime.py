"""Device choice, mixed precision, and a Ctrl-C (or a cluster's time limit) that stops at a
step boundary."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from fewshot_cli.cores import cpu_quota, usable_cores  # noqa: F401 (cpu_quota: re-exported)
from fewshot_cli.errors import FewshotError, Interrupted


def resolve_device(kind: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise FewshotError(f"device={kind} is unknown; choose device=auto, device=cpu or "
                           "device=cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FewshotError("device=cuda was asked for but no CUDA GPU is available; "
                           "use device=cpu or device=auto")
    return torch.device(kind)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than float32, so bf16 is refused there."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_for(device: torch.device,
                 precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for ``device.precision`` (fp32 or bf16).

    bf16 is autocast to bfloat16: matrix products and convolutions in bfloat16, reductions and
    the loss in float32, the weights and their optimizer state in float32. On CUDA, and on a CPU
    with native bfloat16 (``native_bf16``); the speed and the meta-gradient error against float64
    are measured by ``scripts/profile_preset.py``.
    """
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise FewshotError(f"device.precision={precision} is unknown; choose fp32 or bf16")
    if device.type == "cpu" and not native_bf16():
        raise FewshotError("device.precision=bf16 needs a GPU or a CPU with native bfloat16 "
                           "(AVX512-BF16 or AMX), which this one lacks; use "
                           "device.precision=fp32")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


# Below this many floating-point operations per step (forward and backward of the images a step
# feeds the backbone), a second intra-op thread gains nothing: the kernels are too small to
# split (``scripts/bench_threads.py`` measures where the gain starts on your machine).
SMALL_STEP_FLOPS = 1e9


def choose_threads(choice: int | str, device: torch.device, jobs: int,
                   step_flops: float) -> tuple[int, str]:
    """``device.threads``: the intra-op thread count, and why, as logged at the start of a run.

    ``auto`` gives each of the ``jobs`` processes that run at once on this machine (a joblib
    sweep's workers, torchrun's local ranks) an equal share of :func:`usable_cores`, and one
    thread to a model whose step is under ``SMALL_STEP_FLOPS`` (``step_flops``: floating-point
    operations per training step; its kernels are too small to split, and a spare thread only
    spins when the machine is busy). An integer is taken as it is. Raises FewshotError for
    anything else.
    """
    if choice != "auto":
        if isinstance(choice, bool) or not isinstance(choice, int) or not 1 <= choice <= 1024:
            raise FewshotError(f"device.threads={choice} must be auto or a number of threads "
                               "from 1 to 1024")
        return choice, f"device.threads={choice}"
    cores = usable_cores()
    share = max(1, cores // max(1, jobs))
    why = f"auto: {cores} usable cores, {jobs} process{'es' if jobs > 1 else ''} at once"
    if device.type == "cpu" and step_flops < SMALL_STEP_FLOPS and share > 1:
        return 1, f"{why}, a small model ({step_flops / 1e9:.2g} GFLOP a step)"
    return share, why


def forward_flops(network: torch.nn.Module, example: torch.Tensor) -> float:
    """Floating-point operations of ``network(example)`` (PyTorch's own counter of matrix
    products and convolutions; 0 for a network made of other operations), run in eval mode
    without gradients, so no BatchNorm statistic or random state moves."""
    from torch.utils.flop_counter import FlopCounterMode

    training = network.training
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            network.eval()(example)
    except Exception:  # a network that cannot take this example: count it as large
        return math.inf
    finally:
        network.train(training)
    return float(counter.get_total_flops())


M_TOP_PAD = -2  # glibc's mallopt parameter: extra bytes to grow (and keep) the heap by


def pad_host_heap(pad_bytes: int = 1 << 30) -> bool:
    """Let glibc grow the heap in steps of ``pad_bytes`` and keep them; True where applied.

    A training step allocates and frees activations of tens to hundreds of MB. With glibc's
    defaults each one is a fresh mapping the kernel zeroes page by page, which can be much of
    a CPU evaluation's time; the pad keeps the pages instead (``scripts/bench_cpu.py`` measures
    the gain on your machine). A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_TOP_PAD, pad_bytes))
    except (OSError, AttributeError):  # no libc to open, or a libc without mallopt (musl)
        return False


def memory_format_for(device: torch.device, choice: str,
                      prefers_channels_last: bool = True) -> torch.memory_format:
    """``device.memory_format``: auto is channels_last on the CPU when the algorithm gains.

    oneDNN's CPU convolutions are faster on channels_last weights (``scripts/bench_cpu.py``
    measures by how much, on top of the heap pad), but second-order MAML's double backward does
    not gain, so an algorithm can decline; on CUDA auto keeps the contiguous layout.
    """
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    if choice == "auto":
        choice = "channels_last" if device.type == "cpu" and prefers_channels_last else (
            "contiguous")
    if choice not in formats:
        raise FewshotError(f"device.memory_format={choice} is unknown; choose auto, "
                           "channels_last or contiguous")
    return formats[choice]


def episodes_per_batch(device: torch.device, choice: int | str) -> int:
    """``eval.batch``: auto evaluates 16 episodes at once on CUDA and 4 on the CPU.

    On the CPU bigger batches gain next to nothing per image once the heap is padded
    (``scripts/bench_cpu.py`` times several batch sizes), so 4 episodes keep the activations
    small.
    """
    if choice == "auto":
        return 16 if device.type == "cuda" else 4
    if not isinstance(choice, int) or choice < 1:
        raise FewshotError(f"eval.batch={choice} must be a positive number of episodes or auto")
    return choice


def preempt_signal() -> signal.Signals:
    """The signal a cluster sends before it stops a job (a time limit, a preemption): SIGUSR2,
    as submitit asks SLURM for (``--signal=USR2@90``), or ``$SUBMITIT_PREEMPT_SIGNAL``."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


REQUEUED = ".requeued"  # in a run folder: its job saved last.pt and asked to be requeued


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/last.pt`` when this very job (the same submitit/SLURM job id) saved it before
    asking to be requeued (:meth:`StopRequest.leave`), so the requeued job continues from it;
    None otherwise (a new run, or another job's folder, which the run folder then refuses)."""
    marker, last = run_dir / REQUEUED, run_dir / "last.pt"
    job = submitit_job_id()
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return last if job is not None and saved.get("job") == job and last.is_file() else None


def submitit_job_id() -> str | None:
    """The id of the submitit job (SLURM's, or submitit's local executor's) this process runs
    in, or None outside one."""
    if "submitit" not in sys.modules:  # a job of submitit has imported it to unpickle us
        return None
    import submitit

    env = submitit.JobEnvironment()
    return str(env.job_id) if env.activated() else None


class StopRequest:
    """The first Ctrl-C or SIGTERM (torchrun stopping its workers, a cluster's kill) asks the
    loop to stop after the current step and save; a second Ctrl-C or SIGTERM aborts at once,
    whatever the phase (a long validation never reaches the step's end).

    SIGUSR2 (:func:`preempt_signal`), which SLURM sends under submitit before a time limit or
    a preemption, does the same, and then hands over to submitit's own handler of it (saved at
    :meth:`installed`), which requeues the job: submitit's handler alone would exit mid-step,
    after the last validation's ``last.pt``."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.signals = (signal.SIGINT, signal.SIGTERM, preempt_signal())
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        preempt = signum == self.signals[2]
        if self.requested and not preempt:  # a second Ctrl-C or SIGTERM: abort now
            raise KeyboardInterrupt
        self.requested = True
        if self.signum is None or preempt:  # the cluster's reason wins
            self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        try:
            yield self
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

    def reason(self) -> str:
        """Why the run stops: "interrupted", "time limit" or "preempted" (submitit tells these
        apart by the job's time so far), or the signal's name when no submitit handler said."""
        if self.signum != self.signals[2]:
            return "interrupted"
        timed_out = getattr(getattr(self.previous.get(self.signum), "__self__", None),
                            "has_timed_out", None)
        if timed_out is None:
            return f"stopped by {signal.Signals(self.signum).name} (a cluster's warning of a " \
                   "time limit or preemption)"
        return "time limit" if timed_out() else "preempted"

    def leave(self, step: int, path: Path, resume_command: str) -> NoReturn:
        """Called once ``last.pt`` (``path``) is saved at ``step``: raise Interrupted, or, after
        SIGUSR2 in a submitit job, let submitit requeue it (it exits the process) with a
        marker in the run folder that makes the requeued job continue from ``path``
        (:func:`requeued_checkpoint`).

        Raises:
            Interrupted: the run stopped and is not requeued; the sentence says how to continue.
            SystemExit: submitit requeued the job.
        """
        why = self.reason()
        handler = self.previous.get(self.signum) if self.signum is not None else None
        job = submitit_job_id()
        if why in ("time limit", "preempted") and callable(handler) and job is not None:
            marker = path.parent / REQUEUED
            marker.write_text(json.dumps({"job": job, "step": step, "reason": why}))
            logging.getLogger("fewshot").info(
                "%s at step %d: saved %s; submitit requeues the job, which continues from it",
                why, step, path)
            try:
                handler(self.signum, None)  # checkpoints the submission, requeues, exits
            except Exception as err:  # submitit's UncompletedJobError: not requeued
                marker.unlink(missing_ok=True)
                raise Interrupted(f"{why} at step {step}: saved {path}; the job was not "
                                  f"requeued ({str(err).strip().rstrip('.')}); continue with "
                                  f"{resume_command}") from None
            raise SystemExit(-1)  # a handler that returned (a rank other than 0) still stops
        raise Interrupted(f"{why} at step {step}: saved {path}; continue with {resume_command}")
