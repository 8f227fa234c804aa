"""Device choice, mixed precision, and a Ctrl-C that stops at a step boundary."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import torch

from fewshot_cli.errors import FewshotError


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


def autocast_for(device: torch.device,
                 precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for ``device.precision`` (fp32 or bf16)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise FewshotError(f"device.precision={precision} is unknown; choose fp32 or bf16")
    if device.type != "cuda":
        raise FewshotError("device.precision=bf16 needs a CUDA device; use device.precision=fp32 "
                           "on the CPU")
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16)


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
