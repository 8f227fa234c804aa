"""Scores over fixed tasks (their interval: fewshot_cli.intervals.normal_ci95)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fewshot_cli.algorithms.base import MetaAlgorithm


def score_tasks(algo: MetaAlgorithm, batches: Iterable[Any],
                autocast: Callable = contextlib.nullcontext,
                progress: Callable | None = None, on_batch: Callable | None = None
                ) -> torch.Tensor:
    """Per-task scores ``[tasks]`` of ``algo`` in evaluation mode, without gradients.

    ``progress(n)`` (optional) is told after each batch how many tasks it scored (a progress
    bar's ``update``).
    ``on_batch(tasks)`` (optional) sees every batch too: the evaluator scores the classical
    baselines of a data set on the very same tasks with it.
    """
    algo.eval()
    scores = []
    with torch.no_grad():
        for tasks in batches:
            with autocast():
                scores.append(algo.score(tasks).float().cpu())
            if progress is not None:
                progress(len(scores[-1]))
            if on_batch is not None:
                on_batch(tasks)
    return torch.cat(scores) if scores else torch.empty(0)  # a rank may get no batch
