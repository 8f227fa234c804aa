"""BatchNorm policies of the inner loop (``algo.batchnorm``).

Neither policy keeps running statistics, so ``eval()`` changes nothing and a task never sees
another task's statistics:

* ``task`` (Finn et al. 2017): every BatchNorm normalises with the statistics of the images it
  is given (a task's support set, or its query set), in training and evaluation alike.
* ``support`` (after Ravi & Larochelle 2017): the same in training; at evaluation the query set
  is normalised with the statistics of the task's support set, so none is computed from test
  images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.errors import FewshotError

BATCHNORM_POLICIES = ("task", "support")


def check_batchnorm(policy: str) -> None:
    """``algo.batchnorm`` must name a policy; raises FewshotError naming the key otherwise."""
    if policy not in BATCHNORM_POLICIES:
        raise FewshotError(f"algo.batchnorm={policy} is unknown; choose task (per-task batch "
                           "statistics in training and evaluation) or support (test queries "
                           "normalised with the support set's statistics)")


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
        self.native = False  # set by use_native_kernel() outside vmap, where the kernel is exact
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


def use_native_kernel(module: nn.Module, native: bool) -> None:
    """Let every TaskBatchNorm of ``module`` use torch's fused kernel (exact in the per-task
    loop, not under ``vmap``'s double backward), or the plain ops."""
    for m in module.modules():
        if isinstance(m, TaskBatchNorm):
            m.native = native


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
