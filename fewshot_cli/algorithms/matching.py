"""Matching Networks (Vinyals et al., NeurIPS 2016), with optional full-context embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm, embed_episode
from fewshot_cli.episode import Backbone
from fewshot_cli.errors import FewshotError


class SupportContext(nn.Module):
    """g(x_i, S): a bidirectional LSTM over the support embeddings, added to them (skip)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, features, batch_first=True, bidirectional=True)

    def forward(self, support: torch.Tensor) -> torch.Tensor:
        """``[B, M, D]`` support embeddings to context embeddings of the same shape."""
        out, _ = self.lstm(support)
        forward, backward = out.chunk(2, dim=-1)
        return support + forward + backward


class QueryAttention(nn.Module):
    """f(x, S): an LSTM that attends over the support for ``steps`` read steps per query.

    The paper feeds ``[h, r]`` as the recurrent state; an LSTM cell whose input is ``[f'(x), r]``
    has exactly the same gate pre-activations, so the read vector enters through the input.
    """

    def __init__(self, features: int, steps: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(2 * features, features)
        self.steps = steps

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Query embeddings ``[B, Q, D]`` conditioned on context support ``[B, M, D]``."""
        b, q, d = query.shape
        flat = query.reshape(b * q, d)
        h, c = torch.zeros_like(flat), torch.zeros_like(flat)
        read = torch.zeros_like(query)
        for _ in range(self.steps):
            h, c = self.cell(torch.cat([flat, read.reshape(b * q, d)], dim=-1), (h, c))
            h = h + flat
            attention = torch.softmax(h.view(b, q, d) @ support.transpose(1, 2), dim=-1)
            read = attention @ support
        return h.view(b, q, d)


class MatchingNet(FewShotAlgorithm):
    """Attention over the support by cosine similarity; a class's probability sums its shots.

    ``predict`` returns log-probabilities, so the default cross-entropy loss is the paper's
    negative log-likelihood. ``fce=True`` adds the full-context embeddings (g: bidirectional
    LSTM over the support, f: attention LSTM with ``fce_steps`` reads), batched over tasks.
    """

    def __init__(self, backbone: Backbone, ways: int, fce: bool = False, fce_steps: int = 5,
                 scale: float = 1.0) -> None:
        super().__init__(backbone, ways)
        if fce_steps < 1:
            raise FewshotError(f"algo.fce_steps={fce_steps} must be at least 1; the paper's "
                               "attention LSTM reads the support a few (e.g. 5) times")
        if scale <= 0:
            raise FewshotError(f"algo.scale={scale} must be positive; 1.0 is the paper's plain "
                               "cosine attention")
        self.scale = scale
        self.fce = fce
        features = backbone.out_features
        self.support_context = SupportContext(features) if fce else None
        self.query_attention = QueryAttention(features, fce_steps) if fce else None

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        support_f, query_f = embed_episode(self.backbone, support, query)
        if self.fce:
            support_f = self.support_context(support_f)
            query_f = self.query_attention(query_f, support_f)
        cosine = F.normalize(query_f, dim=-1) @ F.normalize(support_f, dim=-1).transpose(1, 2)
        attention = torch.softmax(self.scale * cosine, dim=-1)  # [B, Q, M]
        one_hot = F.one_hot(support_y, ways).to(attention.dtype)  # [B, M, ways]
        # A tiny floor keeps log() finite when a class gets no attention at all.
        return (attention @ one_hot).clamp_min(1e-12).log()
