"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Each task trains the network from the initialisation θ for ``inner_steps`` steps of the inner
optimizer (Adam with β1 = 0, the authors') on minibatches of its support set; the meta-update
moves θ toward the adapted weights φ_i, θ ← θ + ε_t · mean_i(φ_i − θ), with the outer step ε_t
annealed linearly from ``outer_step`` to ``outer_step_final`` over ``anneal_steps``. The loss
handed to the trainer carries the gradient ε_t · (θ − mean_i φ_i): ``train.optimizer`` SGD with
lr 1 takes exactly that step (the presets); Adam on it is the variant the paper also names. First
order by construction: no graph is kept through the inner loop (conf/algo/reptile.yaml cites
the authors' code for every setting).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from fewshot_cli.algorithms.inner_loop import (
    Adam,
    InnerLoopLearner,
    UpdateRule,
    carry_gradients,
    full_precision,
)
from fewshot_cli.episode import Backbone, Episode
from fewshot_cli.errors import FewshotError


class Reptile(InnerLoopLearner):
    """An initialisation that ``inner_steps`` steps of ``update_rule`` (default Adam, lr 0.001,
    β1 = 0) on ``inner_batch`` support images at a time adapt well; at test time
    ``eval_inner_steps`` steps on ``eval_inner_batch`` (null: all the support images). The
    reported loss and accuracy are the queries' after adaptation."""

    def __init__(self, backbone: Backbone, ways: int, inner_steps: int = 5,
                 eval_inner_steps: int = 50, inner_batch: int | None = 10,
                 eval_inner_batch: int | None = None, outer_step: float = 1.0,
                 outer_step_final: float = 0.0, anneal_steps: int = 100000,
                 batchnorm: str = "support", batching: str = "auto",
                 update_rule: Callable[..., UpdateRule] | None = None) -> None:
        if inner_steps < 1 or eval_inner_steps < 0 or anneal_steps < 1:
            raise FewshotError(f"algo.inner_steps={inner_steps} and algo.anneal_steps="
                               f"{anneal_steps} must be at least 1 and algo.eval_inner_steps="
                               f"{eval_inner_steps} at least 0")
        super().__init__(backbone, ways, inner_steps, eval_inner_steps, batchnorm=batchnorm,
                         batching=batching, inner_batch=inner_batch,
                         eval_inner_batch=eval_inner_batch)
        rule = update_rule or partial(Adam, lr=1e-3, betas=(0.0, 0.999))
        self.inner_rule = rule(self.fast_shapes(), inner_steps)
        self.outer_steps = (outer_step, outer_step_final, anneal_steps)
        self.outer_step = outer_step

    @property
    def rule(self) -> UpdateRule:
        """The inner optimizer."""
        return self.inner_rule

    def set_step(self, step: int) -> None:
        """ε_t, linearly from ``outer_step`` to ``outer_step_final`` (authors' train.py 54-55)."""
        super().set_step(step)
        first, final, steps = self.outer_steps
        self.outer_step = first + (final - first) * min(step / steps, 1.0)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """A loss whose gradient is ε_t · (θ − mean_i φ_i) and whose value is the query
        cross-entropy after adaptation, and the adapted query logits ``[B, N*Q, ways]``."""
        with torch.no_grad():
            fast = self.adapted_weights(episode.support, episode.support_y)
            logits = self.classify(fast, episode.support, episode.query)
            value = F.cross_entropy(full_precision(logits.flatten(0, 1)),
                                    episode.query_y.flatten())
        theta = dict(self.named_parameters())
        grads = [self.outer_step * (theta[n].detach() - fast[n].mean(0)) for n in fast]
        return carry_gradients([theta[n] for n in fast], grads, value), logits
