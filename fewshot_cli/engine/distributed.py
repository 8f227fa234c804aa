"""Data-parallel meta-training under ``torchrun``: one process per device, one global meta-batch.

Every rank draws the same global meta-batch (same seed, same sampler) and meta-trains on its
slice of the tasks; after ``backward`` the meta-gradients are averaged across ranks with one
all-reduce. Because the training loss is a mean over tasks and every slice has the same size,
the averaged gradient is the gradient of the 1-process loss, so a 2-process run follows the
1-process trajectory to float32 rounding.

Why an explicit all-reduce and not ``DistributedDataParallel``: DDP hooks the gradients of a
module's ``forward``, but our algorithms compute their loss in ``meta_loss`` and the MAML family
differentiates through a functional inner loop (``torch.func``) that DDP's reducer does not see;
one all-reduce of the flattened gradients after ``backward`` composes with every algorithm.

BatchNorm layers that normalise a whole meta-batch at once (ProtoNet's, Matching's, Relation's
Conv4) become :class:`CrossRankBatchNorm`, which takes its statistics over the global batch as
the 1-process run does (torch's SyncBatchNorm refuses CPU tensors); the MAML family's per-task
BatchNorm needs nothing. Only rank 0 writes checkpoints, TensorBoard events and the progress bar.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fewshot_cli.errors import FewshotError


def _differentiable_all_reduce() -> Any:
    """A sum over the ranks whose backward pass sums the gradients over the ranks too: torch's
    functional collective where it has a backward (recent torch), else the older
    ``torch.distributed.nn.functional.all_reduce`` (deprecated, with a FutureWarning, since)."""
    from torch.distributed import _functional_collectives as collectives

    if hasattr(collectives, "all_reduce_setup_context"):  # its autograd formula is registered
        return lambda x: collectives.wait_tensor(collectives.all_reduce(x, "sum",
                                                                         dist.group.WORLD))
    from torch.distributed.nn.functional import all_reduce

    return all_reduce


differentiable_all_reduce = _differentiable_all_reduce()


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the images of every rank.

    Same parameters, buffers and state-dict names as the BatchNorm it replaces. The mean and the
    variance are all-reduced (two passes, as the 1-process kernel computes them) with a
    differentiable all-reduce, so the backward pass also sees the global batch.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        dist.all_reduce(count)
        mean = differentiable_all_reduce(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = differentiable_all_reduce(centred.pow(2).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var * count / max(float(count) - 1, 1.0)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _cross_rank_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            where = next(itertools.chain(child.parameters(), child.buffers())).device
            replacement = CrossRankBatchNorm(child.num_features, child.eps, child.momentum,
                                             child.affine, child.track_running_stats).to(where)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            _cross_rank_batchnorm(child)


def _slurm_tasks_as_ranks() -> None:
    """A submitit job of several SLURM tasks (``hydra.launcher.tasks_per_node``) is one
    data-parallel run: submitit sets the ranks and rank 0's address as torchrun would."""
    if int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    except Exception:  # not inside a submitit job (plain srun users run torchrun themselves)
        pass


class Processes:
    """This process's part in the run: rank ``rank`` of ``world`` (1 without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.world = rank, world
        self.device = device
        self._stop_agreed = False

    @classmethod
    def start(cls, device: torch.device) -> Processes:
        """Join the torchrun job (gloo on the CPU, nccl on CUDA), or stay a single process.

        Returns the device this rank computes on (``cuda:<LOCAL_RANK>`` on GPUs)."""
        if not launched_by_torchrun():
            _slurm_tasks_as_ranks()
        if not launched_by_torchrun():
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=30))
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, events, logs and the progress bar."""
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ---- what each rank trains on

    def check_meta_batch(self, meta_batch: int, key: str = "train.meta_batch") -> None:
        if meta_batch % self.world:
            raise FewshotError(f"{key}={meta_batch} cannot be split evenly over "
                               f"{self.world} processes; choose a multiple of {self.world}")

    def prepare(self, algo: nn.Module) -> nn.Module:
        """The algorithm with batch-wide BatchNorm statistics taken across ranks."""
        if self.world > 1:
            _cross_rank_batchnorm(algo)
        return algo

    def shard(self, tasks: Any) -> Any:
        """This rank's equal slice of a global meta-batch (every tensor field of ``tasks`` whose
        first dimension is the meta-batch)."""
        if self.world == 1:
            return tasks
        fields = {f.name: getattr(tasks, f.name) for f in dataclasses.fields(tasks)}
        size = next(v.shape[0] for v in fields.values() if isinstance(v, torch.Tensor))
        part = size // self.world
        start = self.rank * part
        return dataclasses.replace(tasks, **{
            name: value[start:start + part] for name, value in fields.items()
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size})

    # ---- what the ranks agree on

    def average_gradients(self, params: list[nn.Parameter], stop: bool,
                          bad: torch.Tensor) -> torch.Tensor:
        """Average the meta-gradients over ranks in one all-reduce, which also carries each
        rank's stop request (Ctrl-C or SIGTERM on any rank stops every rank at the same step)
        and whether its loss was not finite (``bad``, a device bool); returns whether any
        rank's was, still on the device.

        A parameter that got no gradient on any rank keeps ``grad=None``, as in one process
        (the optimizer then skips it).
        """
        if self.world == 1:
            self._stop_agreed = stop
            return bad
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flags = torch.tensor([float(p.grad is not None) for p in params] + [float(stop)],
                             dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] +
                         [flags, bad.to(grads[0].dtype).reshape(1)])
        dist.all_reduce(flat)
        values, used, agreed = flat[: -len(flags) - 1], flat[-len(flags) - 1:-2], flat[-2:]
        values.div_(self.world)
        offset = 0
        for p, g, had in zip(params, grads, (used > 0).tolist(), strict=True):
            g.copy_(values[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
            p.grad = g if had else None
        self._stop_agreed = bool(agreed[0] > 0)
        return agreed[1] > 0

    def stop_agreed(self, requested: bool) -> bool:
        """Whether the run stops before the next step: in one process the local request; under
        torchrun what the last all-reduce said, so that every rank stops at the same step."""
        return requested if self.world == 1 else self._stop_agreed

    def my_batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Every ``world``-th batch of fixed validation tasks, starting at this rank's."""
        for i, batch in enumerate(batches):
            if i % self.world == self.rank:
                yield batch

    def gather(self, scores: torch.Tensor) -> torch.Tensor:
        """All ranks' per-task scores, rank by rank."""
        if self.world == 1:
            return scores
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, scores.cpu())
        return torch.cat(parts)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

