"""The MAML family on the shared inner loop (``algorithms/inner_loop/``), batched over tasks.

One class covers MAML (Finn et al. 2017, second order by default), first-order MAML, Meta-SGD
(Li et al. 2017, a learned inner learning rate per parameter) and ANIL (Raghu et al. 2020, adapt
the head only), plus the MAML++ options of Antoniou et al. 2019 (per-layer per-step learned
inner learning rates, the annealed multi-step loss, first-to-second-order annealing). All of
them step with the :class:`~fewshot_cli.algorithms.inner_loop.SGD` update rule; its learned
rates (Meta-SGD, LSLR) keep their state-dict names ``inner_lrs.*``.

The inner loop is functional: ``grad`` of the support loss with respect to a dict of fast
weights, mapped over the tasks either by ``vmap`` or by a Python loop (``algo.batching``); both
run the very same step function, so they agree to rounding. The first inner step of every task
starts from the same meta-weights, so it runs as one batched forward with shared weights.

BatchNorm policy (``algo.batchnorm=task``, as in Finn et al.): every BatchNorm of the backbone
normalises with the statistics of the images it is given (a task's support set, or its query
set) in training *and* evaluation, and keeps no running statistics, so ``algo.eval()`` changes
nothing and a task never sees another task's statistics. ``support`` normalises test queries
with the support set's statistics instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from fewshot_cli.algorithms.inner_loop import SGD, InnerLoopLearner, UpdateRule
from fewshot_cli.episode import Backbone, Episode
from fewshot_cli.errors import FewshotError


class MAML(InnerLoopLearner):
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

    def __init__(self, backbone: Backbone, ways: int, inner_lr: float = 0.4,
                 inner_steps: int = 1, eval_inner_steps: int = 3, first_order: bool = False,
                 adapt: str = "all", learn_inner_lr: bool = False,
                 inner_lr_range: tuple[float, float] | None = None, per_step_lr: bool = False,
                 multi_step_loss: bool = False, msl_anneal_steps: int = 10000,
                 first_order_until: int = 0, batchnorm: str = "task", batching: str = "auto",
                 checkpoint_steps: bool = False, task_chunk: int | None = None,
                 update_rule: Callable[..., UpdateRule] | None = None) -> None:
        if inner_steps < 1 or eval_inner_steps < 0:
            raise FewshotError(f"algo.inner_steps={inner_steps} must be at least 1 and "
                               f"algo.eval_inner_steps={eval_inner_steps} at least 0")
        # Learned inner rates are nn.Parameters of the rule, so the meta-optimizer sees them.
        rule = update_rule or partial(SGD, lr=inner_lr, per_weight=learn_inner_lr,
                                      per_step=per_step_lr, lr_range=inner_lr_range)
        super().__init__(backbone, ways, inner_steps, eval_inner_steps, adapt, batchnorm,
                         batching, checkpoint_steps, task_chunk)
        # The attribute is the rule's state-dict prefix: checkpoints keep "inner_lrs.*".
        self.inner_lrs = rule(self.fast_shapes(), inner_steps)
        self.inner_lr = inner_lr
        self.first_order, self.first_order_until = first_order, first_order_until
        self.multi_step_loss, self.msl_anneal_steps = multi_step_loss, msl_anneal_steps
        self.per_step_lr, self.learn_inner_lr = per_step_lr, learn_inner_lr
        self.step = 0

    @property
    def rule(self) -> UpdateRule:
        """SGD with the fixed or learned rates (or the rule ``update_rule`` built)."""
        return self.inner_lrs

    def set_step(self, step: int) -> None:
        """The current meta-training step, for the MAML++ annealing schedules."""
        super().set_step(step)
        self.step = step

    def _msl_weights(self) -> list[float]:
        """MAML++ multi-step loss weights: uniform at first, annealed onto the last step."""
        s = self.inner_steps
        floor = 0.03 / s
        progress = min(self.step / max(self.msl_anneal_steps, 1), 1.0)
        early = max(1.0 / s * (1.0 - progress), floor)
        return [early] * (s - 1) + [1.0 - early * (s - 1)]

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy after ``inner_steps`` on each task (MSL-weighted if set)."""
        first_order = self.first_order or self.step < self.first_order_until
        weights = self._msl_weights() if self.multi_step_loss else None
        return self.adapted_loss(episode, self.inner_steps, first_order, weights)
