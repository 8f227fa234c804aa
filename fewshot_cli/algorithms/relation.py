"""Relation Networks (Sung et al., CVPR 2018): a learned comparison of feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.backbones.conv4 import conv_block
from fewshot_cli.episode import Backbone, Episode
from fewshot_cli.errors import FewshotError


class RelationModule(nn.Module):
    """Two pooled conv blocks over a concatenated pair of maps, then FC-ReLU-FC-sigmoid."""

    def __init__(self, map_shape: tuple[int, int, int], channels: int = 64,
                 hidden: int = 8) -> None:
        super().__init__()
        c, h, w = map_shape
        self.convs = nn.Sequential(conv_block(2 * c, channels, pool=True),
                                   conv_block(channels, channels, pool=True))
        flat = channels * (h // 4) * (w // 4)
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """``[P, 2C, h, w]`` concatenated maps to relation scores ``[P]`` in [0, 1]."""
        return torch.sigmoid(self.fc(self.convs(pairs).flatten(1))).squeeze(-1)


class RelationNet(FewShotAlgorithm):
    """Scores each (query, class) pair with a relation module; trained by MSE to one-hot.

    The backbone must keep a spatial map: Conv4 with ``pooled_blocks=2`` (the paper's encoder,
    ``backbone=conv4_relation``). With K shots a class's map is the sum of its support maps.
    """

    def __init__(self, backbone: Backbone, ways: int, channels: int = 64,
                 hidden: int = 8) -> None:
        super().__init__(backbone, ways)
        shape = backbone.feature_map
        if shape is None or min(shape[1:]) < 4:
            raise FewshotError(
                f"algo=relation needs backbone feature maps of at least 4x4, but this backbone "
                f"gives {shape or 'pooled features'}; use backbone=conv4_relation")
        self.map_shape = shape
        self.relation = RelationModule(shape, channels, hidden)

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        b, m, q = support.shape[0], support.shape[1], query.shape[1]
        images = torch.cat([support, query], dim=1).flatten(0, 1)
        maps = self.backbone(images).reshape(b, m + q, -1)  # flat or not, same layout
        one_hot = F.one_hot(support_y, ways).to(maps.dtype)  # [B, M, ways]
        classes = (one_hot.transpose(1, 2) @ maps[:, :m]).view(b, 1, ways, *self.map_shape)
        queries = maps[:, m:].view(b, q, 1, *self.map_shape)
        pairs = torch.cat([classes.expand(-1, q, -1, -1, -1, -1),
                           queries.expand(-1, -1, ways, -1, -1, -1)], dim=3)
        return self.relation(pairs.flatten(0, 2)).view(b, q, ways)

    def class_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Relation scores are similarities in [0, 1] (trained towards one-hot), not logits:
        normalised to sum to one."""
        scores = scores.float().clamp_min(1e-12)
        return scores / scores.sum(dim=-1, keepdim=True)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.predict(episode.support, episode.support_y, episode.query, episode.ways)
        target = F.one_hot(episode.query_y, episode.ways).to(scores.dtype)
        return F.mse_loss(scores.float(), target.float()), scores
