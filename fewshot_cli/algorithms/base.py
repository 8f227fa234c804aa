"""The interface every few-shot algorithm implements; trainer and evaluator know only this."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.episode import Episode


class FewShotAlgorithm(nn.Module):
    """Wraps a plain backbone network and owns the episode logic around it.

    Subclasses implement :meth:`predict`; the default :meth:`loss` is cross-entropy of the query
    logits. The evaluator calls ``predict`` under ``torch.no_grad()``: an algorithm that needs
    gradients at test time (MAML's inner loop) turns them back on itself. Every algorithm is
    built as ``Algo(backbone=..., ways=train.ways, **algo_config)``.
    """

    #: ``device.memory_format=auto`` gives the weights the channels_last layout on the CPU
    #: unless an algorithm runs slower with it (see ``engine.runtime.memory_format_for``).
    prefers_channels_last: bool = True

    def __init__(self, backbone: nn.Module, ways: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.ways = ways

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        """Logits ``[B, N*Q, ways]`` for the query images of each task in the meta-batch."""
        raise NotImplementedError

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-training loss of a meta-batch and the query logits ``[B, N*Q, ways]``."""
        logits = self.predict(episode.support, episode.support_y, episode.query, episode.ways)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), episode.query_y.flatten())
        return loss, logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[B]`` of logits ``[B, M, ways]`` against labels ``[B, M]``."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=-1)


def embed_episode(backbone: nn.Module, support: torch.Tensor, query: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat support ``[B, M, D]`` and query ``[B, N*Q, D]`` features from one backbone pass."""
    b, m = support.shape[:2]
    images = torch.cat([support, query], dim=1).flatten(0, 1)
    features = backbone(images).flatten(1).unflatten(0, (b, -1))
    return features[:, :m], features[:, m:]
