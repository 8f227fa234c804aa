"""The inner-loop learner: a backbone and a linear head whose weights adapt to each task.

MAML and its variants, Meta-LSTM and Reptile are subclasses: each builds its update rule from
:meth:`InnerLoopLearner.fast_shapes`, keeps it under its own attribute (the rule's state-dict
prefix: ``inner_lrs``, ``meta_learner``) and returns it from :attr:`InnerLoopLearner.rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fewshot_cli import draws
from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.algorithms.inner_loop.adapt import (
    MSL_TAG,
    QUERY_TAG,
    SUPPORT_FEATURES_TAG,
    adaptation,
    batching_mode,
    check_batching,
    draw_minibatches,
    full_precision,
    last,
    seeded_map,
)
from fewshot_cli.algorithms.inner_loop.batchnorm import (
    check_batchnorm,
    statistics_from_first,
    use_native_kernel,
    use_task_batchnorm,
)
from fewshot_cli.algorithms.inner_loop.rules import Params, UpdateRule
from fewshot_cli.episode import Backbone, Episode
from fewshot_cli.errors import FewshotError


@dataclass
class InnerTasks:
    """A meta-batch as the inner loop sees it: the weights it keeps (``slow``) and the initial
    weights it adapts (``fast``); each task's support and query inputs, images or (when only the
    head adapts) their features, embedded once; how the tasks are mapped (``mode``); and whether
    queries are normalised with the support set's statistics (``from_support``); each task's
    seed for its random layers (``seeds`` ``long [B]``, None: torch's generator)."""

    slow: Params
    fast: Params
    support: torch.Tensor
    support_y: torch.Tensor | None
    query: torch.Tensor | None
    mode: str
    from_support: bool
    seeds: torch.Tensor | None = None


def carry_gradients(params: list[torch.Tensor], grads: list[torch.Tensor | None],
                    value: torch.Tensor) -> torch.Tensor:
    """A 0-dim loss whose value is ``value`` and whose ``backward()`` adds ``grads`` to the
    ``params``' gradients: for meta-gradients taken another way (chunk by chunk, or Reptile's
    θ − φ), handed to a trainer that calls ``backward()`` on the loss."""
    surrogate = sum((p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None)
    return surrogate - surrogate.detach() + value


def task_seeds(tasks: int) -> torch.Tensor | None:
    """The seeds ``long [tasks]`` of the episode whose meta-loss is being computed (see
    ``fewshot_cli.draws``), or None outside one."""
    given = draws.current()
    if given is None or given.seeds.dim() != 1:
        return None
    if len(given.seeds) != tasks:
        raise ValueError(f"{len(given.seeds)} task seeds for {tasks} tasks")
    return given.seeds


class InnerLoopLearner(FewShotAlgorithm):
    """A backbone and a linear head whose weights adapt to each task in the inner loop.

    The network's own parameters are the initial fast weights (MAML's meta-learned
    initialisation, Meta-LSTM's c₀, Reptile's θ); :attr:`rule` adapts them. ``adapt=head``
    adapts only the head (the body embeds each task once). ``inner_batch`` and
    ``eval_inner_batch``: each step sees a random minibatch of that many support images (all of
    them when null or larger). Memory: ``batching=loop`` backpropagates task by task,
    ``task_chunk`` makes vmap do so chunk by chunk, and ``checkpoint_steps`` recomputes each
    inner step in the backward pass (long inner loops).
    """

    # channels_last does not speed up the second-order meta-step on the CPU (profiled):
    # BatchNorm's double backward sums slowly over channels_last tensors, and with a 1-channel
    # input the first block stays NCHW, so max-pool's backward converts layouts.
    prefers_channels_last = False
    fixed_ways = True  # the linear head has train.ways outputs
    binds_classes_to_outputs = True  # output i of the meta-learned head is label i

    def __init__(self, backbone: Backbone, ways: int, inner_steps: int, eval_inner_steps: int,
                 adapt: str = "all", batchnorm: str = "task", batching: str = "auto",
                 checkpoint_steps: bool = False, task_chunk: int | None = None,
                 inner_batch: int | None = None, eval_inner_batch: int | None = None) -> None:
        super().__init__(backbone, ways)
        if adapt not in ("all", "head"):
            raise FewshotError(f"algo.adapt={adapt} is unknown; choose all (MAML) or head (ANIL)")
        check_batching(batching)
        check_batchnorm(batchnorm)
        for key, size in (("task_chunk", task_chunk), ("inner_batch", inner_batch),
                          ("eval_inner_batch", eval_inner_batch)):
            if size is not None and size < 1:
                raise FewshotError(f"algo.{key}={size} must be at least 1, or null for all "
                                   f"{'tasks' if key == 'task_chunk' else 'support images'} "
                                   "at once")
        use_task_batchnorm(backbone)
        self.head = nn.Linear(backbone.out_features, ways)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.head_only, self.batchnorm, self.batching = adapt == "head", batchnorm, batching
        self.checkpoint_steps, self.task_chunk = checkpoint_steps, task_chunk
        self.inner_batch, self.eval_inner_batch = inner_batch, eval_inner_batch

    @property
    def rule(self) -> UpdateRule:
        """The update rule of the inner loop, kept by each subclass under its own name."""
        raise NotImplementedError

    def fast_shapes(self) -> dict[str, torch.Size]:
        """The shapes of the weights the inner loop adapts, by name: what a rule is built from."""
        params = self._network_params()
        return {n: params[n].shape for n in self._fast_names()}

    # ---- the network as a function of its weights

    def _network_params(self) -> Params:
        return {n: p for n, p in self.named_parameters() if n.startswith(("backbone.", "head."))}

    def _fast_names(self) -> list[str]:
        names = list(self._network_params())
        return [n for n in names if n.startswith("head.")] if self.head_only else names

    def _embed(self, params: Params, images: torch.Tensor) -> torch.Tensor:
        """Flat features ``[M, D]`` of one task's images with the weights ``params``."""
        backbone = {n[len("backbone."):]: p for n, p in params.items()
                    if n.startswith("backbone.")}
        return functional_call(self.backbone, backbone, (images,)).flatten(1)

    def _query_features(self, from_support: bool, params: Params, support: torch.Tensor,
                        query: torch.Tensor) -> torch.Tensor:
        """Query features; under the support policy with the support set's statistics."""
        if not from_support:
            return self._embed(params, query)
        with statistics_from_first(self.backbone, len(support)):
            return self._embed(params, torch.cat([support, query]))[len(support):]

    def _logits(self, slow: Params, fast: Params, x: torch.Tensor) -> torch.Tensor:
        """One task's logits ``[M, ways]`` of its images (or, adapt=head, features) ``x``."""
        p = {**slow, **fast}
        features = x if self.head_only else self._embed(p, x)
        return F.linear(features, p["head.weight"], p["head.bias"])

    def _query_logits(self, slow: Params, from_support: bool, fast: Params,
                      support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        p = {**slow, **fast}
        features = query if self.head_only else self._query_features(from_support, p, support,
                                                                     query)
        return F.linear(features, p["head.weight"], p["head.bias"])

    def _query_loss(self, slow: Params, fast: Params, x: torch.Tensor, y: torch.Tensor
                    ) -> torch.Tensor:
        return F.cross_entropy(full_precision(self._logits(slow, fast, x)), y)

    # ---- adapting and classifying a meta-batch

    def _tasks(self, support: torch.Tensor, support_y: torch.Tensor | None,
               query: torch.Tensor | None, mode: str, evaluate: bool,
               seeds: torch.Tensor | None = None) -> InnerTasks:
        """The meta-batch as the inner loop sees it (ANIL embeds both sets once here); ``seeds``
        default to those of the meta-loss's episode (``fewshot_cli.draws``)."""
        seeds = task_seeds(len(support)) if seeds is None else seeds
        use_native_kernel(self.backbone, mode == "loop")
        params = self._network_params()
        names = self._fast_names()
        fast = {n: params[n] for n in names}
        slow = {n: p for n, p in params.items() if n not in fast}
        from_support = evaluate and self.batchnorm == "support"
        if self.head_only:  # ANIL: the body is fixed in the inner loop, so embed once per task
            if query is not None:
                query = seeded_map(mode, partial(self._query_features, from_support),
                                   (None, 0, 0), seeds, QUERY_TAG)(slow, support, query)
            support = seeded_map(mode, self._embed, (None, 0), seeds, SUPPORT_FEATURES_TAG)(
                slow, support)
        return InnerTasks(slow, fast, support, support_y, query, mode, from_support, seeds)

    def _minibatches(self, support: torch.Tensor, steps: int, evaluate: bool,
                     seeds: torch.Tensor | None) -> torch.Tensor | None:
        """The support rows each step sees, or None for all of them; drawn from each task's
        seed. Evaluation draws every task's from seed 0, so an episode is adapted the same way
        in every run, whatever batch it is evaluated in."""
        size = self.eval_inner_batch if evaluate else self.inner_batch
        tasks, rows = support.shape[:2]
        if size is None or size >= rows or not steps:
            return None
        if evaluate:
            seeds = torch.zeros(tasks, dtype=torch.long, device=support.device)
        return draw_minibatches(tasks, rows, steps, size, support.device, seeds)

    def _adaptation(self, tasks: InnerTasks, steps: int, first_order: bool, evaluate: bool
                    ) -> Iterator[Params]:
        return adaptation(partial(self._logits, tasks.slow), tasks.fast, self.rule,
                          tasks.support, tasks.support_y, steps, first_order=first_order,
                          mode=tasks.mode, checkpoint_steps=self.checkpoint_steps,
                          minibatches=self._minibatches(tasks.support, steps, evaluate,
                                                        tasks.seeds), seeds=tasks.seeds)

    def _classify(self, tasks: InnerTasks, fast: Params, adapted: bool) -> torch.Tensor:
        """Query logits ``[B, N*Q, ways]`` with each task's weights (``adapted``: batched)."""
        logits = partial(self._query_logits, tasks.slow, tasks.from_support)
        return seeded_map(tasks.mode, logits, (0 if adapted else None, 0, 0), tasks.seeds,
                          QUERY_TAG)(fast, tasks.support, tasks.query)

    def adapted_weights(self, support: torch.Tensor, support_y: torch.Tensor,
                        steps: int | None = None, first_order: bool = True,
                        evaluate: bool = False) -> Params:
        """Each task's adapted weights ``{name: [B, ...]}`` after ``steps`` (``inner_steps``
        by default) inner steps on its support set (images ``[B, N*K, C, H, W]``, labels
        ``long [B, N*K]``), named as in ``named_parameters()``: every weight of the network, or
        the head's alone (``adapt=head``). ``first_order``: the rule's inputs are constants of
        any meta-gradient; under ``torch.no_grad()`` no graph is kept at all. ``evaluate``:
        minibatches of ``eval_inner_batch``."""
        steps = self.inner_steps if steps is None else steps
        tasks = self._tasks(support, support_y, None, self._mode(support.device), evaluate)
        return last(self._adaptation(tasks, steps, first_order, evaluate), tasks.fast)

    def classify(self, fast: Params, support: torch.Tensor, query: torch.Tensor,
                 evaluate: bool = False) -> torch.Tensor:
        """Query logits ``[B, N*Q, ways]`` with each task's adapted weights ``fast`` (from
        :meth:`adapted_weights`); ``evaluate``: the BatchNorm policy's test-time statistics."""
        tasks = self._tasks(support, None, query, self._mode(support.device), evaluate)
        return self._classify(tasks, fast, adapted=True)

    def adapt_and_classify(self, support: torch.Tensor, support_y: torch.Tensor,
                           query: torch.Tensor, steps: int, first_order: bool, mode: str,
                           query_y: torch.Tensor | None = None,
                           msl_weights: list[float] | None = None, evaluate: bool = False,
                           seeds: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query logits ``[B, N*Q, ways]`` after ``steps`` inner steps on each task's support
        set, and the weighted query losses of the intermediate steps (0 without MSL).
        ``evaluate`` applies the BatchNorm policy's test-time statistics; ``seeds``
        ``long [B]``: the tasks' seeds for random draws (default: the episode's)."""
        tasks = self._tasks(support, support_y, query, mode, evaluate, seeds)
        fast, extra = tasks.fast, tasks.support.new_zeros(())
        for t, fast in enumerate(self._adaptation(tasks, steps, first_order, evaluate)):
            if msl_weights is not None and t < steps - 1:  # MAML++'s multi-step loss
                losses = seeded_map(mode, partial(self._query_loss, tasks.slow), (0, 0, 0),
                                    tasks.seeds, MSL_TAG + t)(fast, tasks.query, query_y)
                extra = extra + msl_weights[t] * losses.mean()
        return self._classify(tasks, fast, adapted=steps > 0), extra

    def _mode(self, device: torch.device) -> str:
        """The batching over tasks on ``device`` (see :func:`batching_mode`)."""
        return batching_mode(self.batching, device)

    # ---- meta-training and evaluation

    def adapted_loss(self, episode: Episode, steps: int, first_order: bool,
                     msl_weights: list[float] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy after ``steps`` inner steps on each task (MSL-weighted if
        ``msl_weights``), and the query logits; meta-batched as ``batching`` says."""

        seeds = task_seeds(episode.meta_batch)

        def run(mode: str, tasks: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
            logits, extra = self.adapt_and_classify(
                episode.support[tasks], episode.support_y[tasks], episode.query[tasks],
                steps, first_order, mode, episode.query_y[tasks], msl_weights,
                seeds=None if seeds is None else seeds[tasks])
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
        return carry_gradients(params, grads, value), torch.cat(logits)

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
