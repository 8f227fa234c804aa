"""Episode: a meta-batch of few-shot tasks, the one currency of data, algorithms and engine.

Ground floor: imports nothing of fewshot, so algorithms, engine and data all import it downward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Episode:
    """A meta-batch of ``B`` few-shot tasks (``N`` ways, ``K`` shots, ``Q`` queries per class).

    support ``float [B, N*K, C, H, W]``, support_y ``long [B, N*K]``,
    query ``float [B, N*Q, C, H, W]``, query_y ``long [B, N*Q]``; labels run 0..N-1 and
    images are ordered class by class (``support_y[b] == [0]*K + [1]*K + ...``).
    """

    support: torch.Tensor
    support_y: torch.Tensor
    query: torch.Tensor
    query_y: torch.Tensor
    ways: int
    shots: int
    queries: int

    @property
    def meta_batch(self) -> int:
        return self.support.shape[0]

    def to(self, device: torch.device | str) -> Episode:
        return replace(
            self,
            support=self.support.to(device),
            support_y=self.support_y.to(device),
            query=self.query.to(device),
            query_y=self.query_y.to(device),
        )
