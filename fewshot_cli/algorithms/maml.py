"""The MAML family, batched over the tasks of a meta-batch with ``torch.func``.

One class covers MAML (Finn et al. 2017, second order by default), first-order MAML, Meta-SGD
(Li et al. 2017, a learned inner learning rate per parameter) and ANIL (Raghu et al. 2020, adapt
the head only), plus the MAML++ options of Antoniou et al. 2019 (per-layer per-step learned
inner learning rates, the annealed multi-step loss, first-to-second-order annealing).

The inner loop is functional: ``grad`` of the support loss with respect to a dict of fast
weights, mapped over the tasks either by ``vmap`` or by a Python loop (``algo.batching``); both
run the very same step function, so they agree to rounding. The first inner step of every task
starts from the same meta-weights, so it runs as one batched forward with shared weights.

BatchNorm policy (``algo.batchnorm=task``, the only one, as in Finn et al.): every BatchNorm of
the backbone normalises with the statistics of the images it is given (a task's support set, or
its query set) in training *and* evaluation, and keeps no running statistics, so ``algo.eval()``
changes nothing and a task never sees another task's statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.episode import Episode
from fewshot_cli.errors import FewshotError

Params = dict[str, torch.Tensor]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, ...]`` normalised per channel over the M images (and positions)."""
        if self.native:  # one fused kernel: faster, and exact when not under vmap
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Statistics in at least float32, also when autocast hands in bf16 activations.
        wide = x if x.dtype == torch.float64 else x.float()
        var, mean = torch.var_mean(wide, dims, correction=0, keepdim=True)
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


class MAML(FewShotAlgorithm):
    """Model-Agnostic Meta-Learning and its variants, one config away from each other.

    ``first_order`` drops the second-order terms; ``learn_inner_lr`` (Meta-SGD) learns an inner
    learning rate per weight; ``adapt=head`` (ANIL) adapts only the linear head; ``per_step_lr``
    learns one rate per layer and inner step (MAML++ LSLR); ``multi_step_loss`` adds the query
    loss after every inner step with weights annealed onto the last over ``msl_anneal_steps``
    meta-steps (MAML++ MSL); ``first_order_until`` trains first-order for that many meta-steps
    before switching to second order (MAML++ DA). Memory: ``batching=loop`` backpropagates task
    by task, ``task_chunk`` makes vmap do so chunk by chunk, and ``checkpoint_steps`` recomputes
    each inner step in the backward pass (long inner loops).
    """

    # On 2 CPU cores channels_last did not speed up the second-order meta-step: on the
    # miniImageNet shape it was 30-55% slower in each of four runs, on Omniglot's mixed.
    # Profiled: BatchNorm's double backward sums slowly over channels_last tensors, and with a
    # 1-channel input the first block stays NCHW, so max-pool's backward converts layouts.
    prefers_channels_last = False
    fixed_ways = True  # the linear head has train.ways outputs

    def __init__(self, backbone: nn.Module, ways: int, inner_lr: float = 0.4,
                 inner_steps: int = 1, eval_inner_steps: int = 3, first_order: bool = False,
                 adapt: str = "all", learn_inner_lr: bool = False,
                 inner_lr_range: tuple[float, float] | None = None, per_step_lr: bool = False,
                 multi_step_loss: bool = False, msl_anneal_steps: int = 10000,
                 first_order_until: int = 0, batchnorm: str = "task", batching: str = "auto",
                 checkpoint_steps: bool = False, task_chunk: int | None = None) -> None:
        super().__init__(backbone, ways)
        if inner_steps < 1 or eval_inner_steps < 0:
            raise FewshotError(f"algo.inner_steps={inner_steps} must be at least 1 and "
                               f"algo.eval_inner_steps={eval_inner_steps} at least 0")
        if adapt not in ("all", "head"):
            raise FewshotError(f"algo.adapt={adapt} is unknown; choose all (MAML) or head (ANIL)")
        if batching not in ("auto", "vmap", "loop"):
            raise FewshotError(f"algo.batching={batching} is unknown; choose auto, vmap or loop")
        if task_chunk is not None and task_chunk < 1:
            raise FewshotError(f"algo.task_chunk={task_chunk} must be at least 1, or null for "
                               "the whole meta-batch at once")
        if batchnorm != "task":
            raise FewshotError(f"algo.batchnorm={batchnorm} is unknown; the supported policy is "
                               "task (per-task batch statistics in training and evaluation)")
        if not hasattr(backbone, "out_features"):
            raise FewshotError("the backbone has no out_features; MAML needs a backbone that "
                               "flattens its features (set backbone.flatten=true)")
        use_task_batchnorm(backbone)
        self.head = nn.Linear(backbone.out_features, ways)
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, \
            eval_inner_steps
        self.first_order, self.first_order_until = first_order, first_order_until
        self.adapt, self.batching, self.checkpoint_steps = adapt, batching, checkpoint_steps
        self.task_chunk = task_chunk
        self.multi_step_loss, self.msl_anneal_steps = multi_step_loss, msl_anneal_steps
        self.per_step_lr, self.learn_inner_lr = per_step_lr, learn_inner_lr
        self.step = 0

        # Learned inner rates are nn.Parameters of the algorithm, so the meta-optimizer sees
        # them; keys are the fast weight names with '.' (not allowed in a ParameterDict) as '__'.
        self.inner_lrs = nn.ParameterDict()
        if learn_inner_lr or per_step_lr:
            for name, p in self._network_params().items():
                if name in self._fast_names():
                    shape = ((inner_steps,) if per_step_lr else ()) + (
                        p.shape if learn_inner_lr else ())
                    lr = torch.full(shape, float(inner_lr))
                    if inner_lr_range is not None:
                        lr.uniform_(*inner_lr_range)
                    self.inner_lrs[name.replace(".", "__")] = nn.Parameter(lr)

    def set_step(self, step: int) -> None:
        """The current meta-training step, for the MAML++ annealing schedules."""
        self.step = step

    def _network_params(self) -> Params:
        return {n: p for n, p in self.named_parameters() if n.startswith(("backbone.", "head."))}

    def _fast_names(self) -> list[str]:
        names = list(self._network_params())
        return [n for n in names if n.startswith("head.")] if self.adapt == "head" else names

    def _lr(self, name: str, step: int) -> torch.Tensor | float:
        if not self.inner_lrs:
            return self.inner_lr
        lr = self.inner_lrs[name.replace(".", "__")]
        # Steps beyond the trained ones (eval_inner_steps > inner_steps) reuse the last rate.
        return lr[min(step, self.inner_steps - 1)] if self.per_step_lr else lr

    def _msl_weights(self) -> list[float]:
        """MAML++ multi-step loss weights: uniform at first, annealed onto the last step."""
        s = self.inner_steps
        floor = 0.03 / s
        progress = min(self.step / max(self.msl_anneal_steps, 1), 1.0)
        early = max(1.0 / s * (1.0 - progress), floor)
        return [early] * (s - 1) + [1.0 - early * (s - 1)]

    def _embed(self, params: Params, images: torch.Tensor) -> torch.Tensor:
        backbone = {n[len("backbone."):]: p for n, p in params.items()
                    if n.startswith("backbone.")}
        return functional_call(self.backbone, backbone, (images,))

    def adapt_and_classify(self, support: torch.Tensor, support_y: torch.Tensor,
                           query: torch.Tensor, steps: int, first_order: bool, mode: str,
                           query_y: torch.Tensor | None = None,
                           msl_weights: list[float] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query logits ``[B, N*Q, ways]`` after ``steps`` inner steps on each task's support
        set, and the weighted query losses of the intermediate steps (0 without MSL)."""
        tmap = vmap if mode == "vmap" else loop_map
        for m in self.backbone.modules():
            if isinstance(m, TaskBatchNorm):
                m.native = mode == "loop"
        params = self._network_params()
        names = self._fast_names()
        fast = {n: params[n] for n in names}
        slow = {n: p for n, p in params.items() if n not in fast}
        head_only = self.adapt == "head"
        if head_only:  # ANIL: the body is fixed in the inner loop, so embed once per task
            support = tmap(self._embed, (None, 0))(slow, support)
            query = tmap(self._embed, (None, 0))(slow, query)

        def logits_of(fast: Params, x: torch.Tensor) -> torch.Tensor:
            p = {**slow, **fast}
            features = x if head_only else self._embed(p, x)
            return F.linear(features, p["head.weight"], p["head.bias"])

        def support_loss(fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits_of(fast, x), y)

        def query_loss(fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(full_precision(logits_of(fast, x)), y)

        def inner_step(s: int, batched: bool) -> Callable:
            def one_task(fast: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
                g = grad(support_loss)(fast, x, y)
                return {n: fast[n] - self._lr(n, s) * (g[n].detach() if first_order else g[n])
                        for n in names}

            # Step 0 starts every task from the same meta-weights: unbatched, shared weights.
            mapped = tmap(one_task, (0 if batched else None, 0, 0))

            def flat_step(x: torch.Tensor, y: torch.Tensor, *values: torch.Tensor
                          ) -> tuple[torch.Tensor, ...]:
                out = mapped(dict(zip(names, values, strict=True)), x, y)
                return tuple(out[n] for n in names)

            return flat_step

        extra = support.new_zeros(())
        for s in range(steps):
            flat_step = inner_step(s, batched=s > 0)
            values = tuple(fast[n] for n in names)
            if self.checkpoint_steps and torch.is_grad_enabled():
                values = checkpoint(flat_step, support, support_y, *values, use_reentrant=True)
            else:
                values = flat_step(support, support_y, *values)
            fast = dict(zip(names, values, strict=True))
            if msl_weights is not None and s < steps - 1:
                losses = tmap(query_loss, (0, 0, 0))(fast, query, query_y)
                extra = extra + msl_weights[s] * losses.mean()
        logits = tmap(logits_of, (0 if steps else None, 0))(fast, query)
        return logits, extra

    def _mode(self, device: torch.device) -> str:
        """``algo.batching``; ``auto`` is vmap on CUDA and loop on the CPU.

        Measured by scripts/bench_maml.py (README): on an H200 vmap made the Omniglot meta-step
        13x faster than learn2learn's per-task loop; on a 2-core CPU it was 2.6x slower than our
        loop (the CPU is busy with one task already, and vmap's grouped convolutions are slower
        there than plain ones).
        """
        if self.batching != "auto":
            return self.batching
        return "vmap" if device.type == "cuda" else "loop"

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy after ``inner_steps`` on each task (MSL-weighted if set)."""
        first_order = self.first_order or self.step < self.first_order_until
        weights = self._msl_weights() if self.multi_step_loss else None

        def run(mode: str, tasks: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
            logits, extra = self.adapt_and_classify(
                episode.support[tasks], episode.support_y[tasks], episode.query[tasks],
                self.inner_steps, first_order, mode, episode.query_y[tasks], weights)
            final = F.cross_entropy(full_precision(logits.flatten(0, 1)),
                                    episode.query_y[tasks].flatten())
            return (weights[-1] if weights else 1.0) * final + extra, logits

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
                                           True, self._mode(support.device))[0]


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) as float32 for the loss; float32 and float64 kept as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
