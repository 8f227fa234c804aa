"""Accuracy over fixed episodes, reported as mean ± 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from fewshot_cli.algorithms.base import FewShotAlgorithm, accuracy
from fewshot_cli.episode import Episode


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of per-episode accuracies."""
    values = values.double()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), 1.96 * float(values.std()) / math.sqrt(values.numel())


def evaluate_episodes(algo: FewShotAlgorithm, episodes: Iterable[Episode],
                      autocast: Callable = torch.autocast, progress: Callable | None = None
                      ) -> torch.Tensor:
    """Per-episode query accuracy ``[episodes]`` of ``algo`` in evaluation mode, no gradients."""
    algo.eval()
    accs = []
    with torch.no_grad():
        for episode in progress(episodes) if progress else episodes:
            with autocast():
                logits = algo.predict(episode.support, episode.support_y, episode.query,
                                      episode.ways)
            accs.append(accuracy(logits.float(), episode.query_y).cpu())
    return torch.cat(accs)
