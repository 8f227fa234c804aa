"""Random draws that belong to an episode, not to a batch slot, a rank or a recomputation.

A meta-training step gives every task of its meta-batch (every image of a labelled minibatch) a
seed, ``task_seeds(run seed, step, index in the global meta-batch)``. Random layers (dropout,
DropBlock) and algorithms' own draws (Siamese pairs, Reptile's support minibatches) take their
numbers from a counter-based hash of (task seed, draw tag, layer stream, row, element) instead
of torch's generator. So the numbers of a task are the same whether it is computed alone
(``batching=loop``), with the others (``vmap``, chunks), on another rank of a torchrun job, or a
second time (``checkpoint_steps``' recomputed forward), and a resumed run draws what the
uninterrupted one drew. Under ``vmap`` the seed is the mapped task's own 0-dim tensor.

The seeds travel in a context (:func:`drawn_by`) set by the algorithm around its forward passes;
without one (a model called outside the trainer) the layers draw from torch's generator as
before. Ground floor: imports nothing of fewshot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

_MASK = 0xFFFFFFFF
# odd multipliers below 2**31: 32-bit values times them never overflow int64
_MULTIPLIERS = (0x7FEB352D, 0x446CA68B, 0x2C1B3C6D, 0x297A2D39)
_WEYL = 0x9E3779B9  # 2**32 / golden ratio: consecutive elements start far apart


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of ``x`` (int64 values in [0, 2**32))."""
    for m in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * m) & _MASK
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    return _mix((h ^ ((value if isinstance(value, int) else value) & _MASK)) & _MASK)


def task_seeds(seed: int, step: int, count: int, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
    """``long [count]``: the seeds of tasks (or images) ``0..count-1`` of training step ``step``
    of a run seeded ``seed``; task ``i`` gets the same seed however the work is split."""
    base = _combine(_combine(torch.tensor(seed & _MASK), step), seed >> 32)
    return _combine(base.expand(count), torch.arange(count)).to(device)


@dataclass(frozen=True)
class Draws:
    """The seeds of the tasks whose rows a forward pass sees: ``[G]`` (the rows split evenly
    into G tasks, in order) or ``[]`` (one task, as under ``vmap``), and the draw's ``tag``
    (which forward of the task this is: an inner step, the queries ...)."""

    seeds: torch.Tensor
    tag: int = 0


_current: ContextVar[Draws | None] = ContextVar("fewshot_draws", default=None)


@contextmanager
def drawn_by(seeds: torch.Tensor | None, tag: int = 0) -> Iterator[None]:
    """Random layers and draws inside take their numbers from ``seeds`` (``long [G]`` or a 0-dim
    task seed) and ``tag``; ``None`` leaves the enclosing context as it is."""
    if seeds is None:
        yield
        return
    token = _current.set(Draws(seeds, tag))
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Draws | None:
    """The draws' context in force, or None (torch's generator then draws)."""
    return _current.get()


def uniform(shape: tuple[int, ...] | torch.Size, stream: int, device: torch.device,
            draws: Draws | None = None) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape`` ``[rows, ...]``: the rows split evenly over the
    tasks of ``draws`` (default: the context in force), each row's numbers a function of its
    task's seed, the tag, ``stream`` (which layer or draw) and its index within its task.
    Without a context, ``torch.rand`` from torch's generator. Float32."""
    draws = draws or _current.get()
    if draws is None:
        return torch.rand(*shape, device=device)
    rows, per_row = shape[0], math.prod(shape[1:])
    groups = draws.seeds.numel() if draws.seeds.dim() else 1
    if rows % groups:
        raise ValueError(f"{rows} rows cannot be split over {groups} tasks' seeds")
    head = _combine(_combine(draws.seeds.to(device).reshape(-1, 1), draws.tag), stream)
    row = _combine(head, torch.arange(rows // groups, device=device).view(1, -1))
    # Per element (the hot part, as many numbers as the layer's input): the row's key plus a
    # Weyl sequence over the element index, then two rounds of xor-shift-multiply.
    weyl = (torch.arange(per_row, device=device) * _WEYL).view(1, -1)
    x = (row.reshape(rows, 1) + weyl) & _MASK
    for m in _MULTIPLIERS[:2]:
        x = x ^ (x >> 16)
        x = (x * m) & _MASK
    x = x ^ (x >> 15)
    return ((x >> 8).float() * 2.0**-24).view(*shape)


def integers(low: int, high: int, shape: tuple[int, ...], stream: int,
             device: torch.device) -> torch.Tensor:
    """``long`` integers in [low, high) of ``shape`` ``[rows, ...]`` as :func:`uniform` draws
    them (``torch.randint`` without a context)."""
    if _current.get() is None:
        return torch.randint(low, high, shape, device=device)
    u = uniform(shape, stream, device)
    return (low + (u * (high - low)).long()).clamp_max(high - 1)
