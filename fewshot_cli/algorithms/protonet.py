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
    """Classifies a query by the (negative squared Euclidean) distance to each class mean, or by
    its cosine similarity to each class mean times ``scale``; ``learn_scale`` makes that scale a
    parameter, as Meta-Baseline's learned temperature (Chen et al. 2021, initial value 10)."""

    def __init__(self, backbone: Backbone, ways: int, distance: str = "sqeuclidean",
                 scale: float = 10.0, learn_scale: bool = False) -> None:
        super().__init__(backbone, ways)
        if distance not in ("sqeuclidean", "cosine"):
            raise FewshotError(f"algo.distance={distance} is unknown; choose sqeuclidean or cosine")
        if learn_scale and distance != "cosine":
            raise FewshotError("algo.learn_scale=true scales cosine similarities; set "
                               "algo.distance=cosine or algo.learn_scale=false")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise FewshotError(f"algo.scale={scale} must be a positive number (for example 10)")
        self.distance = distance
        # A plain float unless learned, so that checkpoints without it still load.
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        support_f, query_f = embed_episode(self.backbone, support, query)  # one pass
        protos = prototypes(support_f, support_y, ways)
        if self.distance == "cosine":
            return nn.functional.normalize(query_f, dim=-1) @ nn.functional.normalize(
                protos, dim=-1).transpose(1, 2) * self.scale
        return -torch.cdist(query_f, protos).pow(2)
