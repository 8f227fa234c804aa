"""One functional inner loop for the optimisation- and model-based algorithms.

Fast weights are a dict of tensors, ``{name: [B, ...]}`` once batched over the B tasks of a
meta-batch. Four rooms:

* :mod:`.batchnorm`: the BatchNorm policies (``task``, ``support``) and TaskBatchNorm;
* :mod:`.rules`: update rules, one inner step of one task (SGD with fixed or learned rates,
  Adam, Meta-LSTM's LSTM);
* :mod:`.adapt`: the functional step, its batching over tasks (vmap, a loop, chunks) and
  :func:`adapt`, which returns each task's adapted weights to the caller;
* :mod:`.learner`: :class:`InnerLoopLearner`, a backbone and linear head adapted that way, which
  MAML, Meta-LSTM and Reptile subclass (weightgen fine-tunes its generated head with ``adapt``).

**Random and stateful layers** inside the inner loop follow one rule. A layer may draw random
numbers in the step, and every task draws its own: ``vmap`` runs with
``randomness="different"``, the loop draws task by task (so vmap and loop agree to rounding only
without random layers), and a recomputed step (``checkpoint_steps``) replays the numbers it
drew. A layer may not change a tensor it keeps while the step runs under ``torch.func``: state
that evolves over training is advanced outside, once per meta-step, by ``set_step`` (DropBlock's
ramp; see ``fewshot_cli.episode.Backbone``), and BatchNorm keeps no running statistics
(TaskBatchNorm).
"""

from fewshot_cli.algorithms.inner_loop.adapt import (
    adapt,
    adaptation,
    batching_mode,
    check_batching,
    draw_minibatches,
    full_precision,
    loop_map,
    task_map,
)
from fewshot_cli.algorithms.inner_loop.batchnorm import (
    BATCHNORM_POLICIES,
    TaskBatchNorm,
    statistics_from_first,
    use_task_batchnorm,
)
from fewshot_cli.algorithms.inner_loop.learner import InnerLoopLearner, carry_gradients
from fewshot_cli.algorithms.inner_loop.rules import (
    SGD,
    Adam,
    LSTMRule,
    Params,
    UpdateRule,
    preprocess,
)

# Stored configs name rules as fewshot_cli.algorithms.inner_loop.<Rule>: they keep working.
__all__ = [
    "BATCHNORM_POLICIES", "SGD", "Adam", "InnerLoopLearner", "LSTMRule", "Params",
    "TaskBatchNorm", "UpdateRule", "adapt", "adaptation", "batching_mode", "carry_gradients",
    "check_batching", "draw_minibatches", "full_precision", "loop_map", "preprocess",
    "statistics_from_first", "task_map", "use_task_batchnorm",
]
