"""Meta-LSTM (Ravi & Larochelle, ICLR 2017): a learned update rule on the shared inner loop.

The learner (backbone + linear head) starts every task from its learned initial weights c₀ and
takes ``inner_steps`` updates on the task's support set, each computed by the coordinate-wise
meta-learner LSTM (:class:`~fewshot_cli.algorithms.inner_loop.LSTMRule`) from the learner's
gradient and loss: the weights are the LSTM's cell state, the input gate a learned per-coordinate
step size, the forget gate a learned shrinkage. The meta-learner and c₀ are trained on the query
loss of the adapted learner. As in the paper, the gradient and loss fed to the meta-learner are
constants of the meta-gradient (no second derivatives), and the number of updates is the same in
training and testing (the paper trains for the count it tests with). Each update sees the whole
support set: the paper's batch sizes (5 for 5-way 1-shot, 25 for 5-way 5-shot) are the support set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from fewshot_cli.algorithms.inner_loop import InnerLoopLearner, LSTMRule, UpdateRule
from fewshot_cli.episode import Backbone, Episode
from fewshot_cli.errors import FewshotError


class MetaLSTM(InnerLoopLearner):
    """The learner's weights adapted by a meta-learner LSTM, batched over the tasks like MAML.

    ``hidden`` is the first LSTM layer's width (20 in the paper's code), ``preprocess_p`` the
    ``p`` of the gradient and loss preprocessing (10), ``forget_bias`` and ``input_bias`` the
    ranges of the gates' initial biases (U(4, 5) and U(-5, -4) in the paper's code). BatchNorm
    (``batchnorm=support``, after the paper): batch statistics in meta-training, for the support
    and the query set alike; at test time the queries are normalised with the support set's
    statistics, never their own.
    ``update_rule`` replaces the LSTM rule (a partial taking the weights' shapes and steps).
    """

    def __init__(self, backbone: Backbone, ways: int, inner_steps: int = 12, hidden: int = 20,
                 preprocess_p: float = 10.0, forget_bias: tuple[float, float] = (4.0, 5.0),
                 input_bias: tuple[float, float] = (-5.0, -4.0), batchnorm: str = "support",
                 batching: str = "auto",
                 checkpoint_steps: bool = False, task_chunk: int | None = None,
                 update_rule: Callable[..., UpdateRule] | None = None) -> None:
        if inner_steps < 1 or hidden < 1:
            raise FewshotError(f"algo.inner_steps={inner_steps} and algo.hidden={hidden} must "
                               "be at least 1 (the paper: 12 updates for 1-shot, 5 for 5-shot; "
                               "hidden 20)")
        rule = update_rule or partial(LSTMRule, hidden=hidden, p=preprocess_p,
                                      forget_bias=tuple(forget_bias),
                                      input_bias=tuple(input_bias))
        super().__init__(backbone, ways, inner_steps, inner_steps, "all", batchnorm, batching,
                         checkpoint_steps, task_chunk)
        refuse_large_learner(self.fast_shapes(), hidden, inner_steps)
        self.meta_learner = rule(self.fast_shapes(), inner_steps)  # "meta_learner.*" weights

    @property
    def rule(self) -> UpdateRule:
        """The meta-learner LSTM (or the rule ``update_rule`` built)."""
        return self.meta_learner

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy after ``inner_steps`` meta-learner updates on each task."""
        return self.adapted_loss(episode, self.inner_steps, first_order=True)


#: The LSTM activations one task may keep for the meta-gradient, in bytes: above it a run would
#: exhaust a machine's memory (the process is killed, no sentence) rather than train.
MEMORY_BUDGET = 16 * 2**30


def refuse_large_learner(shapes: dict[str, torch.Size], hidden: int, inner_steps: int) -> None:
    """Refuse a learner too large for a coordinate-wise meta-learner: the LSTM runs on every
    weight at every update and keeps its four gates of ``hidden`` units (float32) for the
    backward pass: about ``weights x 64 x hidden x inner_steps`` bytes per task (gates, cell
    and their products in float32; a 2-step ResNet-18 learner exhausted 24 GiB).

    Raises:
        FewshotError: the estimate is above MEMORY_BUDGET (e.g. a ResNet learner).
    """
    weights = sum(math.prod(shape) for shape in shapes.values())
    need = weights * 64 * hidden * inner_steps
    if need > MEMORY_BUDGET:
        raise FewshotError(
            f"algo=meta_lstm would keep about {need / 2**30:.0f} GiB of LSTM activations per "
            f"task: its meta-learner updates each of the learner's {weights:,} weights for "
            f"algo.inner_steps={inner_steps} updates; use the paper's small learner "
            "(backbone=conv4_32) or fewer algo.inner_steps")
