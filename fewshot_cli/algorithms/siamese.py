"""Siamese Networks for one-shot recognition (Koch, Zemel & Salakhutdinov, 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.draws import integers
from fewshot_cli.episode import Backbone, Episode


class SiameseNet(FewShotAlgorithm):
    """Twin embeddings compared by a weighted L1 distance and a sigmoid: p(same class).

    Trained with binary cross-entropy on balanced same/different pairs drawn inside each
    episode; a query is classified by its most similar support image (one-shot N-way).
    """

    def __init__(self, backbone: Backbone, ways: int) -> None:
        super().__init__(backbone, ways)
        self.distance = nn.Linear(backbone.out_features, 1)  # the weights alpha_j of the L1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[..., C, H, W]`` images to codes ``[..., D]``."""
        return self.backbone(images.flatten(0, -4)).flatten(1).view(*images.shape[:-3], -1)

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Same-class logits ``[..., P, R]`` of every code of ``a [..., P, D]`` with ``b``."""
        # sum_j w_j |a_j - b_j| split by the sign of w_j: two L1 distances of rescaled codes,
        # so no [P, R, D] tensor is ever built (20-way 5-shot at D=4096 would not fit).
        w = self.distance.weight[0]
        pos, neg = w.clamp_min(0), (-w).clamp_min(0)
        return (torch.cdist(a * pos, b * pos, p=1) - torch.cdist(a * neg, b * neg, p=1)
                + self.distance.bias)

    def class_scores(self, support: torch.Tensor, support_y: torch.Tensor,
                     query: torch.Tensor, ways: int) -> torch.Tensor:
        """``[B, Q, ways]``: for each class, the logit of its most similar support image."""
        logits = self.pair_logits(query, support)  # [B, Q, M]
        own = F.one_hot(support_y, ways).bool().unsqueeze(1)  # [B, 1, M, ways]
        return logits.unsqueeze(-1).masked_fill(~own, float("-inf")).amax(dim=2)

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        return self.class_scores(self.embed(support), support_y, self.embed(query), ways)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, k, q = episode.meta_batch, episode.ways, episode.shots, episode.queries
        shape = episode.support.shape[-3:]
        images = torch.cat([episode.support.view(b, n, k, *shape),
                            episode.query.view(b, n, q, *shape)], dim=2)  # [B, N, K+Q, ...]
        codes = self.embed(images)  # [B, N, S, D] with S = K + Q images per class
        s = k + q
        # Each image is paired once with another image of its class and once with an image of
        # another class: balanced pairs, and no image is paired with itself.
        cls = torch.arange(n, device=codes.device).view(1, n, 1).expand(b, n, s)
        idx = torch.arange(s, device=codes.device).view(1, 1, s).expand(b, n, s)
        # each task's pairs are drawn by its own seed (fewshot_cli.draws), when it has one
        same_idx = (idx + integers(1, s, idx.shape, 0, codes.device)) % s
        other_cls = (cls + integers(1, n, cls.shape, 1, codes.device)) % n
        other_idx = integers(0, s, idx.shape, 2, codes.device)
        batch = torch.arange(b, device=codes.device).view(b, 1, 1).expand(b, n, s)
        partners = torch.cat([codes[batch, cls, same_idx], codes[batch, other_cls, other_idx]])
        anchors = torch.cat([codes, codes])
        logits = self.distance((anchors - partners).abs()).squeeze(-1)
        target = torch.cat([torch.ones_like(logits[:b]), torch.zeros_like(logits[b:])])
        loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        with torch.no_grad():
            scores = self.class_scores(codes[:, :, :k].flatten(1, 2), episode.support_y,
                                       codes[:, :, k:].flatten(1, 2), n)
        return loss, scores
