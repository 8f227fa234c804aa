"""95% confidence intervals, one function per meaning, and the one way a mean ± CI is printed.

Over episodes (many fixed test or validation tasks of one model): the normal interval,
``normal_ci95``. Over seeds (a few runs of one configuration): Student's t, ``student_t_ci95``.
Every figure the commands print goes through ``format_mean_ci``. Ground floor: imports nothing
of fewshot.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

# Two-sided 95% quantiles of Student's t for 1..9 degrees of freedom (scipy.stats.t.ppf(0.975));
# from 10 on, the Cornish-Fisher expansion in t95 is within 1e-5 of them.
T95_SMALL = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)
Z95 = 1.959963984540054


def normal_ci95(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval of per-task scores ``[tasks]``
    (1.96 standard errors: hundreds of episodes, as the few-shot papers report); the half-width
    is NaN for a single task (there is no spread to estimate)."""
    scores = scores.double()
    if scores.numel() < 2:
        return float(scores.mean()), math.nan
    return float(scores.mean()), 1.96 * float(scores.std()) / math.sqrt(scores.numel())


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof <= len(T95_SMALL):
        return T95_SMALL[dof - 1]
    # Cornish-Fisher expansion of t in powers of 1/dof (Abramowitz & Stegun 26.7.5).
    z = Z95
    terms = ((z**3 + z) / 4,
             (5 * z**5 + 16 * z**3 + 3 * z) / 96,
             (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / dof ** (i + 1) for i, g in enumerate(terms))


def student_t_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the Student t 95% interval of a few values, one per seed (run);
    NaN mean for none, NaN half-width for one."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return values[0], math.nan
    n = len(values)
    return statistics.fmean(values), t95(n - 1) * statistics.stdev(values) / math.sqrt(n)


def scale(metric: str | None) -> tuple[float, str]:
    """How a score is shown: accuracies (fractions) as percentages, anything else as it is."""
    return (100.0, "%") if metric == "accuracy" else (1.0, "")


def format_mean_ci(mean: float | None, ci: float | None, metric: str | None = None, *,
                   unit: bool = True, decimals: int = 2, alone: str = "") -> str:
    """``91.20% ± 0.55%``: a mean and its CI half-width in ``metric``'s scale (accuracy in %,
    with the % sign if ``unit``), ``decimals`` after the point; ``—`` for no mean; the mean
    followed by ``alone`` where there is no half-width (None or NaN: one task or one run)."""
    if mean is None or math.isnan(mean):
        return "—"
    factor, symbol = scale(metric)
    suffix = symbol if unit else ""
    value = f"{factor * mean:.{decimals}f}{suffix}"
    if ci is None or math.isnan(ci):
        return value + alone
    return f"{value} ± {factor * ci:.{decimals}f}{suffix}"
