"""Relation Networks (Sung et al., CVPR 2018): a learned comparison of feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.algorithms.protonet import prototypes
from fewshot_cli.backbones.conv4 import conv_block
from fewshot_cli.episode import Backbone, Episode, TaskShape
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
    ``backbone=conv4_relation``). A class's map is the mean of its support maps times the shot
    count of training (``trained_shots``, ``train.shots``, told by :meth:`check_tasks`): the
    paper's sum of the K maps (Sung et al. 2018, section 3.2) at the trained K, and the scale
    the relation module learned at any other shot count or with unequal shots (fewshot predict),
    where a plain sum would move every query away from the class with more images (issue 28:
    trained 1-shot, tested with eval.shots=5, 86.85% -> 52.40%). A class given one image k times
    is therefore the class given it once.
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
        self.trained_shots = 1  # train.shots, from check_tasks (build_algorithm calls it)

    def check_tasks(self, train: TaskShape, eval: TaskShape) -> None:
        """Remember ``train.shots``: class maps keep the scale of that many summed shots."""
        super().check_tasks(train, eval)
        self.trained_shots = train.shots

    def class_maps(self, maps: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
        """Each class's map ``[B, ways, D]`` of support maps ``[B, M, D]`` (labels ``[B, M]``):
        their mean times ``trained_shots``, the paper's sum at the trained shot count."""
        return prototypes(maps, support_y, ways) * self.trained_shots

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        b, m, q = support.shape[0], support.shape[1], query.shape[1]
        images = torch.cat([support, query], dim=1).flatten(0, 1)
        maps = self.backbone(images).reshape(b, m + q, -1)  # flat or not, same layout
        classes = self.class_maps(maps[:, :m], support_y, ways).view(b, 1, ways, *self.map_shape)
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
