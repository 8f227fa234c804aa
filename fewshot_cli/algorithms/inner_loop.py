"""One functional inner loop for the optimisation- and model-based algorithms.

Fast weights are a dict of tensors. :func:`adapt` runs ``steps`` updates of an *update rule* on
each task's support set, mapped over the tasks of a meta-batch either by ``vmap`` or by a Python
loop (``batching``); both run the very same step function, so they agree to rounding. An update
rule turns (fast weights, their support gradients, the support loss, the step, its per-task
state) into the next fast weights: :class:`SGD` (MAML, FO-MAML, ANIL; learned rates per weight
for Meta-SGD, per layer and step for MAML++ LSLR) and :class:`LSTMRule` (Ravi & Larochelle's
meta-learner LSTM). :class:`InnerLoopLearner` is a backbone and linear head adapted that way,
with the BatchNorm policy, chunked meta-gradients and recomputed inner steps; MAML and
Meta-LSTM are thin subclasses, and weightgen fine-tunes its generated weights with :func:`adapt`.

BatchNorm policies (``batchnorm``); neither keeps running statistics, so ``eval()`` changes
nothing and a task never sees another task's statistics:

* ``task`` (Finn et al.): every BatchNorm normalises with the statistics of the images it is
  given (a task's support set, or its query set), in training and evaluation alike.
* ``support`` (after Ravi & Larochelle): the same in training; at evaluation the query set is
  normalised with the statistics of the task's support set, so none is computed from test images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.checkpoint import checkpoint

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.episode import Episode
from fewshot_cli.errors import FewshotError

Params = dict[str, torch.Tensor]
BATCHNORM_POLICIES = ("task", "support")


class TaskBatchNorm(nn.Module):
    """BatchNorm that always normalises with the statistics of its input and keeps none.

    It takes over the affine weights of the BatchNorm it replaces (same state-dict names). The
    statistics are written out with ``var_mean`` rather than ``F.batch_norm``: under ``vmap``
    the native kernel's double backward gave wrong second-order meta-gradients (torch 2.14,
    off by ~1e-2 in float64), while these plain ops batch and differentiate exactly.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        self.native = False  # the algorithm sets this outside vmap, where the kernel is exact
        self.stats_rows: int | None = None  # set by statistics_from_first()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, ...]`` normalised per channel over the M images (and positions)."""
        if self.native and self.stats_rows is None:  # one fused kernel, exact outside vmap
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Statistics in at least float32, also when autocast hands in bf16 activations.
        wide = x if x.dtype == torch.float64 else x.float()
        reference = wide if self.stats_rows is None else wide[:self.stats_rows]
        var, mean = torch.var_mean(reference, dims, correction=0, keepdim=True)
        out = (wide - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def use_task_batchnorm(module: nn.Module) -> None:
    """Replace each BatchNorm by a TaskBatchNorm: per-task statistics in train and eval mode."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, TaskBatchNorm(child))
        else:
            use_task_batchnorm(child)


@contextlib.contextmanager
def statistics_from_first(module: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, every TaskBatchNorm of ``module`` normalises its whole input with the
    statistics of its first ``rows`` images (the support set placed before the query set)."""
    norms = [m for m in module.modules() if isinstance(m, TaskBatchNorm)]
    for m in norms:
        m.stats_rows = rows
    try:
        yield
    finally:
        for m in norms:
            m.stats_rows = None


def loop_map(fn: Callable, in_dims: tuple[int | None, ...]) -> Callable:
    """``vmap``'s contract as a Python loop over dim 0: tensors or dicts of tensors in and out."""

    def pick(arg: Any, dim: int | None, b: int) -> Any:
        if dim is None:
            return arg
        return {k: v[b] for k, v in arg.items()} if isinstance(arg, dict) else arg[b]

    def stack(outs: list[Any]) -> Any:
        if isinstance(outs[0], dict):
            return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        if isinstance(outs[0], tuple):
            return tuple(stack(list(group)) for group in zip(*outs, strict=True))
        return torch.stack(outs)

    def mapped(*args: Any) -> Any:
        first = next(a for a, d in zip(args, in_dims, strict=True) if d is not None)
        tasks = len(next(iter(first.values()))) if isinstance(first, dict) else len(first)
        return stack([fn(*(pick(a, d, b) for a, d in zip(args, in_dims, strict=True)))
                      for b in range(tasks)])

    return mapped


def task_map(mode: str) -> Callable:
    """``vmap`` for ``batching=vmap``, the per-task Python loop for ``loop``."""
    return vmap if mode == "vmap" else loop_map


def check_batching(batching: str) -> None:
    """``algo.batching`` must be auto, vmap or loop."""
    if batching not in ("auto", "vmap", "loop"):
        raise FewshotError(f"algo.batching={batching} is unknown; choose auto, vmap or loop")


def batching_mode(batching: str, device: torch.device) -> str:
    """``algo.batching``; ``auto`` is vmap on CUDA and loop on the CPU.

    Measured by scripts/bench_maml.py (README): on an H200 vmap made the Omniglot meta-step
    13x faster than learn2learn's per-task loop; on a 2-core CPU it was 2.6x slower than our
    loop (the CPU is busy with one task already, and vmap's grouped convolutions are slower
    there than plain ones).
    """
    if batching != "auto":
        return batching
    return "vmap" if device.type == "cuda" else "loop"


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) as float32 for the loss; float32 and float64 kept as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


class UpdateRule(Protocol):
    """One inner step of one task: the next fast weights from the current ones.

    Built as ``Rule(shapes, steps, **options)`` from the fast weights' shapes and the number of
    inner steps it is trained for; an ``nn.Module`` whose parameters the meta-optimizer learns.
    ``state`` is the rule's own per-task memory (a dict of tensors, empty for SGD).
    """

    def initial_state(self, fast: Params) -> Params:
        """The state before the first step."""
        ...

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """Fast weights and state after inner step ``t`` (support gradients and loss given)."""
        ...


def rate_key(name: str) -> str:
    """A fast weight's name as a ParameterDict key ('.' is not allowed there)."""
    return name.replace(".", "__")


class SGD(nn.ParameterDict):
    """θ ← θ − α ⊙ g, the inner step of the MAML family.

    α is ``lr``, or learned: one rate per weight (``per_weight``, Meta-SGD), one per layer and
    inner step (``per_step``, MAML++ LSLR), or both; the learned rates are this dict's entries,
    keyed by fast weight name, drawn from ``lr_range`` if given. Steps beyond the trained ones
    (more inner steps at test time) reuse the last step's rates.
    """

    def __init__(self, shapes: dict[str, torch.Size], steps: int = 1, lr: float = 0.4,
                 per_weight: bool = False, per_step: bool = False,
                 lr_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.lr, self.steps, self.per_step = float(lr), steps, per_step
        if per_weight or per_step:
            for name, shape in shapes.items():
                rate = torch.full(((steps,) if per_step else ()) + (
                    tuple(shape) if per_weight else ()), self.lr)
                if lr_range is not None:
                    rate.uniform_(*lr_range)
                self[rate_key(name)] = nn.Parameter(rate)

    def rate(self, name: str, t: int) -> torch.Tensor | float:
        """The step size of fast weight ``name`` at inner step ``t``."""
        if not self:
            return self.lr
        rate = self[rate_key(name)]
        return rate[min(t, self.steps - 1)] if self.per_step else rate

    def initial_state(self, fast: Params) -> Params:
        """SGD keeps no state."""
        return {}

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """One gradient step on every fast weight."""
        return {n: fast[n] - self.rate(n, t) * grads[n] for n in fast}, state


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. 2016 (Appendix A): ``x`` as ``(log|x| / p, sign x)`` when
    ``|x| >= e^-p``, else ``(-1, e^p x)``; a trailing dimension of 2.

    Magnitude and sign apart, so coordinates of very different scales give inputs of similar size.
    """
    big = x.abs() >= math.exp(-p)
    log = torch.log(x.abs().clamp_min(math.exp(-p))) / p
    return torch.stack([torch.where(big, log, -torch.ones_like(x)),
                        torch.where(big, torch.sign(x), math.exp(p) * x)], dim=-1)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh as ``2 sigmoid(2x) - 1``: on the CPU torch's tanh kernel was 4x slower than this
    (float32 [20, 28485], one thread: 3.1 ms against 0.75 ms; sigmoid alone 0.28 ms)."""
    return 2 * torch.sigmoid(2 * x) - 1


class LSTMRule(nn.Module):
    """Ravi & Larochelle's meta-learner: the learner's weights are the cell state of an LSTM.

    Coordinate-wise, with parameters shared across all coordinates: a first LSTM layer
    (``hidden`` units) reads the preprocessed gradient and loss of each coordinate; the second
    layer's cell is the weight itself, updated as ``θ_t = f_t ⊙ θ_{t-1} − i_t ⊙ ∇_t`` with the
    learned gates ``f_t = σ(W_F [h_t, θ_{t-1}, f_{t-1}] + b_F)`` and
    ``i_t = σ(W_I [h_t, θ_{t-1}, i_{t-1}] + b_I)``. The initial cell state c₀ is the learner's
    initial weights, which the algorithm learns. ``forget_bias`` and ``input_bias`` are the
    ranges the gate biases are drawn from (the first step's shrinkage and step size).
    """

    def __init__(self, shapes: dict[str, torch.Size], steps: int = 1, hidden: int = 20,
                 p: float = 10.0, forget_bias: tuple[float, float] = (4.0, 5.0),
                 input_bias: tuple[float, float] = (-5.0, -4.0)) -> None:
        super().__init__()
        self.hidden, self.p = hidden, p
        self.lstm = nn.LSTMCell(4, hidden)  # preprocessed gradient (2) and loss (2)
        self.forget = nn.Linear(hidden + 2, 1)
        self.input = nn.Linear(hidden + 2, 1)
        # The authors' initialisation (twitter/meta-learning-lstm, meta-learner-lstm.lua): all
        # weights U(-0.01, 0.01), forget bias U(4, 5) and input bias U(-5, -4), so training
        # starts close to gradient descent with a small learning rate (f ≈ 1, i ≈ 0.01).
        with torch.no_grad():
            for weight in self.parameters():
                weight.uniform_(-0.01, 0.01)
            self.forget.bias.uniform_(*forget_bias)
            self.input.bias.uniform_(*input_bias)

    def initial_state(self, fast: Params) -> Params:
        """Zero LSTM state and zero previous gates for every coordinate."""
        ref = next(iter(fast.values()))
        coords = sum(v.numel() for v in fast.values())
        return {"h": ref.new_zeros(self.hidden, coords), "c": ref.new_zeros(self.hidden, coords),
                "f": ref.new_zeros(coords), "i": ref.new_zeros(coords)}

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """One meta-learner step over all coordinates at once.

        Coordinates run along the last dimension (state ``[hidden, coordinates]``), so each gate
        is a contiguous block; with that, ``chunk`` rather than slices and the sigmoid-based
        tanh, a 12-update meta-step of a Conv4-64 learner (112k coordinates) took 1.2 s instead
        of 3.5 s on one CPU thread (measured once, on a shared machine).
        """
        theta = torch.cat([v.reshape(-1) for v in fast.values()])
        g = torch.cat([grads[n].reshape(-1) for n in fast])
        x = torch.cat([preprocess(g, self.p).T,
                       preprocess(loss, self.p)[:, None].expand(2, len(theta))])  # [4, P]
        # nn.LSTMCell written out: vmap has no batching rule for aten::lstm_cell.
        cell, hidden = self.lstm, self.hidden
        weight = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)
        gates = torch.addmm((cell.bias_ih + cell.bias_hh)[:, None], weight,
                            torch.cat([x, state["h"]]))  # [4 * hidden, P]
        # chunk, not slices: the backward then concatenates instead of zero-filling four times
        gate_i, gate_f, gate_g, gate_o = gates.chunk(4)
        c = torch.sigmoid(gate_f) * state["c"] + torch.sigmoid(gate_i) * tanh(gate_g)
        h = torch.sigmoid(gate_o) * tanh(c)
        w = torch.cat([self.forget.weight, self.input.weight])  # [2, hidden + 2]
        w_h, w_theta, w_prev = w.split([hidden, 1, 1], dim=1)
        # As in the paper's equations the gates read the previous gate values (the authors'
        # lstm-helper.lua feeds the previous pre-activations instead).
        f, i = torch.sigmoid(torch.addmm(torch.cat([self.forget.bias, self.input.bias])[:, None],
                                         w_h, h)
                             + w_theta * theta + w_prev * torch.stack([state["f"], state["i"]]))
        theta = f * theta - i * g
        sizes = [v.numel() for v in fast.values()]
        new = {n: part.view_as(fast[n])
               for n, part in zip(fast, theta.split(sizes), strict=True)}
        return new, {"h": h, "c": c, "f": f, "i": i}


def adapt(logits_of: Callable[[Params, torch.Tensor], torch.Tensor], fast: Params,
          rule: UpdateRule, support: torch.Tensor, support_y: torch.Tensor, steps: int, *,
          first_order: bool, mode: str, checkpoint_steps: bool = False,
          shared_start: bool = True,
          after_step: Callable[[int, Params], None] | None = None) -> Params:
    """Each task's fast weights after ``steps`` updates of ``rule`` on its support set.

    ``logits_of(fast, x)`` classifies one task's inputs ``x`` with its fast weights; ``support``
    is ``[B, M, ...]``. ``shared_start``: every task starts from the same (unbatched) weights,
    so the first step runs as one batched forward with shared weights; else ``fast`` is batched.
    ``first_order`` feeds the rule the gradients and loss as constants (no second derivatives).
    ``after_step(s, fast)`` sees the batched weights after each step but the last (MSL).
    Returns batched fast weights ``[B, ...]`` (``fast`` itself when ``steps`` is 0).
    """
    tmap = task_map(mode)
    names = list(fast)

    def support_loss(fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(fast, x), y)

    def inner_step(s: int, state_names: list[str]) -> tuple[Callable, list[str]]:
        def one_task(fast: Params, state: Params, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[Params, Params]:
            if s == 0:
                state = rule.initial_state(fast)
            grads, loss = grad_and_value(support_loss)(fast, x, y)
            if first_order:
                grads, loss = {n: g.detach() for n, g in grads.items()}, loss.detach()
            return rule.step(fast, grads, loss, s, state)

        start = 0 if s > 0 or not shared_start else None
        mapped = tmap(one_task, (start, 0 if s > 0 else None, 0, 0))
        out_names: list[str] = []  # the new state's names: only tensors leave a checkpoint

        def flat_step(x: torch.Tensor, y: torch.Tensor, *values: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
            fast = dict(zip(names, values[:len(names)], strict=True))
            state = dict(zip(state_names, values[len(names):], strict=True))
            new_fast, new_state = mapped(fast, state, x, y)
            out_names[:] = list(new_state)
            return (*(new_fast[n] for n in names), *new_state.values())

        return flat_step, out_names

    state: Params = {}
    for s in range(steps):
        flat_step, state_names = inner_step(s, list(state))
        values = (*fast.values(), *state.values())
        if checkpoint_steps and torch.is_grad_enabled():
            values = checkpoint(flat_step, support, support_y, *values, use_reentrant=True)
        else:
            values = flat_step(support, support_y, *values)
        fast = dict(zip(names, values[:len(names)], strict=True))
        state = dict(zip(state_names, values[len(names):], strict=True))
        if after_step is not None and s < steps - 1:
            after_step(s, fast)
    return fast


class InnerLoopLearner(FewShotAlgorithm):
    """A backbone and a linear head whose weights adapt to each task in the inner loop.

    The network's own parameters are the initial fast weights (MAML's meta-learned
    initialisation, Meta-LSTM's c₀); ``update_rule(shapes, steps)`` builds the rule that adapts
    them, registered under ``rule_name``. ``adapt=head`` adapts only the head (the body embeds
    each task once). Memory: ``batching=loop`` backpropagates task by task, ``task_chunk`` makes
    vmap do so chunk by chunk, and ``checkpoint_steps`` recomputes each inner step in the
    backward pass (long inner loops).
    """

    # On 2 CPU cores channels_last did not speed up the second-order meta-step: on the
    # miniImageNet shape it was 30-55% slower in each of four runs, on Omniglot's mixed.
    # Profiled: BatchNorm's double backward sums slowly over channels_last tensors, and with a
    # 1-channel input the first block stays NCHW, so max-pool's backward converts layouts.
    prefers_channels_last = False
    fixed_ways = True  # the linear head has train.ways outputs
    #: the attribute holding the update rule (its name prefixes the rule's state-dict keys)
    rule_name = "update_rule"

    def __init__(self, backbone: nn.Module, ways: int, update_rule: Callable[..., UpdateRule],
                 inner_steps: int, eval_inner_steps: int, adapt: str = "all",
                 batchnorm: str = "task", batching: str = "auto",
                 checkpoint_steps: bool = False, task_chunk: int | None = None) -> None:
        super().__init__(backbone, ways)
        if adapt not in ("all", "head"):
            raise FewshotError(f"algo.adapt={adapt} is unknown; choose all (MAML) or head (ANIL)")
        check_batching(batching)
        if task_chunk is not None and task_chunk < 1:
            raise FewshotError(f"algo.task_chunk={task_chunk} must be at least 1, or null for "
                               "the whole meta-batch at once")
        if batchnorm not in BATCHNORM_POLICIES:
            raise FewshotError(f"algo.batchnorm={batchnorm} is unknown; choose task (per-task "
                               "batch statistics in training and evaluation) or support (test "
                               "queries normalised with the support set's statistics)")
        if not hasattr(backbone, "out_features"):
            raise FewshotError("the backbone has no out_features; an inner-loop algorithm needs "
                               "a backbone that flattens its features (set backbone.flatten=true)")
        use_task_batchnorm(backbone)
        self.head = nn.Linear(backbone.out_features, ways)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.adapt, self.batchnorm, self.batching = adapt, batchnorm, batching
        self.checkpoint_steps, self.task_chunk = checkpoint_steps, task_chunk
        params = self._network_params()
        shapes = {n: params[n].shape for n in self._fast_names()}
        setattr(self, self.rule_name, update_rule(shapes, inner_steps))

    @property
    def rule(self) -> UpdateRule:
        """The update rule of the inner loop."""
        return getattr(self, self.rule_name)

    def _network_params(self) -> Params:
        return {n: p for n, p in self.named_parameters() if n.startswith(("backbone.", "head."))}

    def _fast_names(self) -> list[str]:
        names = list(self._network_params())
        return [n for n in names if n.startswith("head.")] if self.adapt == "head" else names

    def _embed(self, params: Params, images: torch.Tensor) -> torch.Tensor:
        backbone = {n[len("backbone."):]: p for n, p in params.items()
                    if n.startswith("backbone.")}
        return functional_call(self.backbone, backbone, (images,))

    def adapt_and_classify(self, support: torch.Tensor, support_y: torch.Tensor,
                           query: torch.Tensor, steps: int, first_order: bool, mode: str,
                           query_y: torch.Tensor | None = None,
                           msl_weights: list[float] | None = None, evaluate: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query logits ``[B, N*Q, ways]`` after ``steps`` inner steps on each task's support
        set, and the weighted query losses of the intermediate steps (0 without MSL).
        ``evaluate`` applies the BatchNorm policy's test-time statistics."""
        tmap = task_map(mode)
        for m in self.backbone.modules():
            if isinstance(m, TaskBatchNorm):
                m.native = mode == "loop"
        params = self._network_params()
        names = self._fast_names()
        fast = {n: params[n] for n in names}
        slow = {n: p for n, p in params.items() if n not in fast}
        head_only = self.adapt == "head"
        from_support = evaluate and self.batchnorm == "support"

        def embed_query(params: Params, support: torch.Tensor, query: torch.Tensor
                        ) -> torch.Tensor:
            """Query features; under the support policy with the support set's statistics."""
            if not from_support:
                return self._embed(params, query)
            with statistics_from_first(self.backbone, len(support)):
                return self._embed(params, torch.cat([support, query]))[len(support):]

        if head_only:  # ANIL: the body is fixed in the inner loop, so embed once per task
            query = tmap(embed_query, (None, 0, 0))(slow, support, query)
            support = tmap(self._embed, (None, 0))(slow, support)

        def logits_of(fast: Params, x: torch.Tensor) -> torch.Tensor:
            p = {**slow, **fast}
            features = x if head_only else self._embed(p, x)
            return F.linear(features, p["head.weight"], p["head.bias"])

        def query_logits(fast: Params, support: torch.Tensor, query: torch.Tensor
                         ) -> torch.Tensor:
            p = {**slow, **fast}
            features = query if head_only else embed_query(p, support, query)
            return F.linear(features, p["head.weight"], p["head.bias"])

        def query_loss(fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(full_precision(logits_of(fast, x)), y)

        extra = support.new_zeros(())

        def multi_step_loss(s: int, fast: Params) -> None:
            nonlocal extra
            losses = tmap(query_loss, (0, 0, 0))(fast, query, query_y)
            extra = extra + msl_weights[s] * losses.mean()

        fast = adapt(logits_of, fast, self.rule, support, support_y, steps,
                     first_order=first_order, mode=mode, checkpoint_steps=self.checkpoint_steps,
                     after_step=multi_step_loss if msl_weights is not None else None)
        logits = tmap(query_logits, (0 if steps else None, 0, 0))(fast, support, query)
        return logits, extra

    def _mode(self, device: torch.device) -> str:
        """The batching over tasks on ``device`` (see :func:`batching_mode`)."""
        return batching_mode(self.batching, device)

    def adapted_loss(self, episode: Episode, steps: int, first_order: bool,
                  msl_weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy after ``steps`` inner steps on each task (MSL-weighted if
        ``msl_weights``), and the query logits; meta-batched as ``batching`` says."""

        def run(mode: str, tasks: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
            logits, extra = self.adapt_and_classify(
                episode.support[tasks], episode.support_y[tasks], episode.query[tasks],
                steps, first_order, mode, episode.query_y[tasks], msl_weights)
            final = F.cross_entropy(full_precision(logits.flatten(0, 1)),
                                    episode.query_y[tasks].flatten())
            return (msl_weights[-1] if msl_weights else 1.0) * final + extra, logits

        return self._chunked(run, self._mode(episode.support.device), episode.meta_batch)

    def _chunked(self, run: Callable, mode: str, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``run`` over the whole meta-batch, or chunk by chunk with each chunk's meta-gradient
        taken at once (as learn2learn's examples do per task), so that peak memory is one
        chunk's graph. The returned loss then carries the summed meta-gradient: its value is
        the true loss and ``backward()`` on it gives the same gradients as the whole graph."""
        chunk = 1 if mode == "loop" else (self.task_chunk or tasks)
        # Reentrant checkpointing needs .backward(), not autograd.grad: one graph then.
        if chunk >= tasks or not torch.is_grad_enabled() or self.checkpoint_steps:
            return run(mode)
        params = [p for p in self.parameters() if p.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(params)
        value, logits = 0.0, []
        for start in range(0, tasks, chunk):
            part = slice(start, min(start + chunk, tasks))
            loss, part_logits = run(mode, part)
            loss = loss * ((part.stop - start) / tasks)
            for i, g in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
            value, logits = value + loss.detach(), logits + [part_logits.detach()]
        surrogate = sum((p * g).sum() for p, g in zip(params, grads, strict=True)
                        if g is not None)
        return surrogate - surrogate.detach() + value, torch.cat(logits)

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        """Adapt to each task with ``eval_inner_steps`` first-order steps; query logits."""
        if ways != self.ways:
            raise FewshotError(f"these tasks have {ways} classes but this model's head was "
                               f"trained for {self.ways}; use {self.ways}-way tasks")
        # No meta-gradient is needed at test time: first order, and grad() works under no_grad.
        with torch.no_grad():
            return self.adapt_and_classify(support, support_y, query, self.eval_inner_steps,
                                           True, self._mode(support.device), evaluate=True)[0]

