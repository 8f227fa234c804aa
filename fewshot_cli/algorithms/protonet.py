"""Prototypical Networks (Snell et al., 2017)."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm, embed_episode
from fewshot_cli.episode import Backbone
from fewshot_cli.errors import FewshotError


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means ``[B, ways, D]`` of support features ``[B, M, D]`` with labels ``[B, M]``."""
    one_hot = nn.functional.one_hot(labels, ways).to(features.dtype)  # [B, M, ways]
    sums = one_hot.transpose(1, 2) @ features
    return sums / one_hot.sum(dim=1).unsqueeze(-1)


class ProtoNet(FewShotAlgorithm):
    """Classifies a query by the (negative squared Euclidean) distance to each class mean."""

    def __init__(self, backbone: Backbone, ways: int, distance: str = "sqeuclidean") -> None:
        super().__init__(backbone, ways)
        if distance not in ("sqeuclidean", "cosine"):
            raise FewshotError(f"algo.distance={distance} is unknown; choose sqeuclidean or cosine")
        self.distance = distance

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        support_f, query_f = embed_episode(self.backbone, support, query)  # one pass
        protos = prototypes(support_f, support_y, ways)
        if self.distance == "cosine":
            return nn.functional.normalize(query_f, dim=-1) @ nn.functional.normalize(
                protos, dim=-1).transpose(1, 2) * 10.0
        return -torch.cdist(query_f, protos).pow(2)
