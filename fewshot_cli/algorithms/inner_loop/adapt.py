"""The functional inner step and its batching over the tasks of a meta-batch.

:func:`task_step` is one update of one task: ``grad`` of the support loss with respect to a
dict of fast weights, handed to the update rule. :func:`adaptation` maps it over the tasks
either by ``vmap`` or by a Python loop (``batching``); both run the very same step, so they
agree to rounding, random layers included when each task has a seed (``seeds``): a task's
random numbers are then drawn from its seed and the step (``fewshot_cli.draws``), the same in
the loop, under vmap, chunk by chunk and in ``checkpoint_steps``' recomputed forward. The
first step of every task starts from the same weights, so it runs as one batched forward with
shared weights. :func:`adapt` returns each task's adapted weights.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap
from torch.utils.checkpoint import checkpoint

from fewshot_cli import draws
from fewshot_cli.algorithms.inner_loop.rules import Params, UpdateRule
from fewshot_cli.errors import FewshotError

#: one task's logits ``[M, ways]`` of its inputs ``x`` ``[M, ...]`` with fast weights
LogitsOf = Callable[[Params, torch.Tensor], torch.Tensor]


def check_batching(batching: str) -> None:
    """``algo.batching`` must be auto, vmap or loop; raises FewshotError naming the key."""
    if batching not in ("auto", "vmap", "loop"):
        raise FewshotError(f"algo.batching={batching} is unknown; choose auto, vmap or loop")


def batching_mode(batching: str, device: torch.device) -> str:
    """``algo.batching``; ``auto`` is vmap on CUDA and loop on the CPU, where vmap's grouped
    convolutions were slower than one task at a time (scripts/bench_maml.py measures both)."""
    if batching != "auto":
        return batching
    return "vmap" if device.type == "cuda" else "loop"


def _pick(arg: Any, dim: int | None, task: int) -> Any:
    """Task ``task`` of a mapped argument (a tensor or a dict of tensors), or ``arg`` itself."""
    if dim is None:
        return arg
    return {k: v[task] for k, v in arg.items()} if isinstance(arg, dict) else arg[task]


def _stack(outs: list[Any]) -> Any:
    """Per-task outputs (tensors, dicts or tuples of them) stacked along a new dim 0."""
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    if isinstance(outs[0], tuple):
        return tuple(_stack(list(group)) for group in zip(*outs, strict=True))
    return torch.stack(outs)


def _looped(fn: Callable, in_dims: tuple[int | None, ...], *args: Any) -> Any:
    first = next(a for a, d in zip(args, in_dims, strict=True) if d is not None)
    tasks = len(next(iter(first.values()))) if isinstance(first, dict) else len(first)
    return _stack([fn(*(_pick(a, d, b) for a, d in zip(args, in_dims, strict=True)))
                   for b in range(tasks)])


def loop_map(fn: Callable, in_dims: tuple[int | None, ...]) -> Callable:
    """``vmap``'s contract as a Python loop over dim 0: tensors or dicts of tensors in and out."""
    return partial(_looped, fn, in_dims)


#: the draw tags of a task's forward passes besides inner step ``t`` (tag ``t``)
QUERY_TAG, MSL_TAG, SUPPORT_FEATURES_TAG, MINIBATCH_TAG = 2**21, 2**20, 2**22, 2**23


def _under_seed(fn: Callable, tag: int, *args: Any) -> Any:
    *args, seed = args
    with draws.drawn_by(seed, tag):
        return fn(*args)


def seeded_map(mode: str, fn: Callable, in_dims: tuple[int | None, ...],
               seeds: torch.Tensor | None, tag: int) -> Callable:
    """``task_map(mode)(fn, in_dims)``, each task's call drawing its random numbers from its
    seed in ``seeds`` ``long [B]`` and ``tag`` (without seeds: as the enclosing context)."""
    if seeds is None:
        return task_map(mode)(fn, in_dims)
    return partial(_seeds_last, task_map(mode)(partial(_under_seed, fn, tag), (*in_dims, 0)),
                   seeds)


def _seeds_last(mapped: Callable, seeds: torch.Tensor, *args: Any) -> Any:
    return mapped(*args, seeds)


def task_map(mode: str) -> Callable:
    """``vmap`` for ``batching=vmap``, the per-task Python loop for ``loop``. Under vmap every
    task draws its own random numbers (``randomness="different"``): dropout masks differ across
    tasks as they do in the loop."""
    return partial(vmap, randomness="different") if mode == "vmap" else loop_map


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) as float32 for the loss; float32 and float64 kept as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


@dataclass(frozen=True)
class InnerProblem:
    """What one task's inner step needs besides its tensors: how it classifies, the rule that
    steps it, and whether the rule's inputs are constants of the meta-gradient."""

    logits_of: LogitsOf
    rule: UpdateRule
    first_order: bool


def support_loss(fast: Params, logits_of: LogitsOf, x: torch.Tensor, y: torch.Tensor
                 ) -> torch.Tensor:
    """Mean cross-entropy of one task's inputs ``x`` ``[M, ...]`` against labels ``y`` ``[M]``."""
    return F.cross_entropy(logits_of(fast, x), y)


def task_step(problem: InnerProblem, t: int, fast: Params, state: Params, x: torch.Tensor,
              y: torch.Tensor) -> tuple[Params, Params]:
    """Inner step ``t`` of one task: the support loss's gradient with respect to ``fast`` (as
    constants when first order), then the rule's next fast weights and state."""
    grads, loss = grad_and_value(support_loss)(fast, problem.logits_of, x, y)
    if problem.first_order:
        grads, loss = {n: g.detach() for n, g in grads.items()}, loss.detach()
    return problem.rule.step(fast, grads, loss, t, state)


def flat_step(step: Callable, names: list[str], state_names: list[str], x: torch.Tensor,
              y: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``step(fast, state, x, y)`` on flat tensors (fast weights, then state, by name): what
    activation checkpointing passes through."""
    fast = dict(zip(names, values[:len(names)], strict=True))
    state = dict(zip(state_names, values[len(names):], strict=True))
    new_fast, new_state = step(fast, state, x, y)
    return (*(new_fast[n] for n in names), *(new_state[n] for n in state_names))


def draw_minibatches(tasks: int, rows: int, steps: int, size: int, device: torch.device,
                     seeds: torch.Tensor | None = None) -> torch.Tensor:
    """Support rows ``long [tasks, steps, size]`` for each inner step of each task: the rows in
    a random order, again and again, cut into minibatches of ``size`` (every row once per pass,
    as openai/supervised-reptile's ``_mini_batches`` without replacement, reptile.py 223-248).
    ``seeds`` ``long [tasks]``: each task's order drawn from its seed (else torch's generator)."""
    passes = -(-steps * size // rows)
    given = None if seeds is None else draws.Draws(seeds, MINIBATCH_TAG)
    order = draws.uniform((tasks, passes, rows), 0, device, given).argsort(-1)
    return order.flatten(1)[:, :steps * size].view(tasks, steps, size)


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, rows[b]]`` for every task b: ``[B, M, ...]``, ``long [B, m]`` -> ``[B, m, ...]``."""
    return x[torch.arange(len(x), device=x.device).unsqueeze(1), rows]


def adaptation(logits_of: LogitsOf, fast: Params, rule: UpdateRule, support: torch.Tensor,
               support_y: torch.Tensor, steps: int, *, first_order: bool, mode: str,
               checkpoint_steps: bool = False, shared_start: bool = True,
               minibatches: torch.Tensor | None = None,
               seeds: torch.Tensor | None = None) -> Iterator[Params]:
    """Each task's fast weights after every one of ``steps`` updates of ``rule``, in turn.

    ``logits_of(fast, x)`` classifies one task's inputs; ``support`` is ``[B, M, ...]`` with
    labels ``support_y`` ``long [B, M]``. ``shared_start``: every task starts from the same
    (unbatched) weights ``fast``; else ``fast`` is batched ``[B, ...]``. ``first_order`` feeds
    the rule the gradients and loss as constants (no second derivatives). ``minibatches``
    ``long [B, steps, m]`` picks the support rows each step sees (default: all of them).
    ``checkpoint_steps`` recomputes each step in the backward pass. ``seeds`` ``long [B]``: each
    task's seed for its random layers (step ``t`` draws with tag ``t``). Yields batched fast
    weights ``{name: [B, ...]}``.
    """
    problem, tmap, names = InnerProblem(logits_of, rule, first_order), task_map(mode), list(fast)
    state = rule.initial_state(fast) if shared_start else tmap(rule.initial_state, (0,))(fast)
    state_names = list(state)
    for t in range(steps):
        start = None if t == 0 and shared_start else 0  # the shared weights and initial state
        mapped = seeded_map(mode, partial(task_step, problem, t), (start, start, 0, 0), seeds, t)
        x, y = support, support_y
        if minibatches is not None:
            x, y = _rows(support, minibatches[:, t]), _rows(support_y, minibatches[:, t])
        step = partial(flat_step, mapped, names, state_names)
        values = (*fast.values(), *state.values())
        if checkpoint_steps and torch.is_grad_enabled():
            values = checkpoint(step, x, y, *values, use_reentrant=True)
        else:
            values = step(x, y, *values)
        fast = dict(zip(names, values[:len(names)], strict=True))
        state = dict(zip(state_names, values[len(names):], strict=True))
        yield fast


def adapt(logits_of: LogitsOf, fast: Params, rule: UpdateRule, support: torch.Tensor,
          support_y: torch.Tensor, steps: int, **options: Any) -> Params:
    """Each task's fast weights ``{name: [B, ...]}`` after ``steps`` updates of ``rule`` on its
    support set (``fast`` itself when ``steps`` is 0); the options are :func:`adaptation`'s."""
    return last(adaptation(logits_of, fast, rule, support, support_y, steps, **options), fast)


def last(weights: Iterator[Params], start: Params) -> Params:
    """The final fast weights of an :func:`adaptation` (``start`` when it takes no step); the
    earlier ones are dropped as they come, so only one step's weights are kept alive."""
    kept = deque(weights, maxlen=1)
    return kept[0] if kept else start
