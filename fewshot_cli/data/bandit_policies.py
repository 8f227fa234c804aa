"""The classical bandit algorithms of Duan et al. (2016, Table 1), vectorised over instances.

Each plays every trial of a :class:`BanditTrials` meta-batch at once (a loop over the pulls, none
over instances) and returns the total reward per trial ``[B]``. As in the paper, every method
starts from a Beta(1, 1) prior, the true distribution of the arm means: one success and one
failure per arm for UCB1 and the greedy methods. Their random choices come from the trials
(``choices``, and ``seed`` for posterior draws), so a score is reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.distributions import Beta

from fewshot_cli.episode import BanditTrials

#: the Gittins table calibrates each state against this many retirement rates in [0, 1]
GITTINS_GRID = 256

Policy = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def play(tasks: BanditTrials, choose: Policy) -> torch.Tensor:
    """Total reward ``[B]`` of ``choose(t, wins, losses) -> arm [B]`` over each trial, where
    ``wins``/``losses`` ``[B, k]`` count each arm's observed rewards before pull ``t``."""
    b, k = tasks.means.shape
    wins = torch.zeros(b, k, device=tasks.means.device)
    losses = torch.zeros_like(wins)
    total = torch.zeros(b, device=wins.device)
    for t in range(tasks.pulls):
        arm = choose(t, wins, losses).unsqueeze(1)
        reward = tasks.pull(t, arm.squeeze(1))
        wins.scatter_add_(1, arm, reward.unsqueeze(1))
        losses.scatter_add_(1, arm, 1 - reward.unsqueeze(1))
        total += reward
    return total


def posterior_mean(wins: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The mean of each arm's Beta(1 + wins, 1 + losses) posterior."""
    return (wins + 1) / (wins + losses + 2)


def _uniform_arm(u: torch.Tensor, arms: int) -> torch.Tensor:
    return (u * arms).long().clamp(max=arms - 1)


def random(tasks: BanditTrials) -> torch.Tensor:
    """A uniformly random arm at every pull."""
    return play(tasks, lambda t, w, lo: _uniform_arm(tasks.choices[:, t], tasks.arms))


def greedy(tasks: BanditTrials) -> torch.Tensor:
    """The arm of highest posterior mean (ties: the first)."""
    return play(tasks, lambda t, w, lo: posterior_mean(w, lo).argmax(1))


def epsilon_greedy(tasks: BanditTrials, epsilon: float) -> torch.Tensor:
    """Greedy, but a uniformly random arm with probability ``epsilon``."""

    def choose(t: int, wins: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        u = tasks.choices[:, t]
        # one uniform number decides both: u < epsilon explores, and then u / epsilon is uniform
        explore = _uniform_arm(u / max(epsilon, 1e-12), tasks.arms)
        return torch.where(u < epsilon, explore, posterior_mean(wins, losses).argmax(1))

    return play(tasks, choose)


def ucb1(tasks: BanditTrials, c: float) -> torch.Tensor:
    """UCB1 as Duan et al. write it: mean + c sqrt(2 log t / T_i), t counting pulls from 1."""

    def choose(t: int, wins: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        pulled = wins + losses + 2
        bonus = c * torch.sqrt(2 * math.log(t + 1) / pulled)
        return (posterior_mean(wins, losses) + bonus).argmax(1)

    return play(tasks, choose)


def _with_seed(tasks: BanditTrials, choose: Policy) -> torch.Tensor:
    """``play`` with torch's random generator seeded by the trials, then restored."""
    device = tasks.means.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(tasks.seed)
        return play(tasks, choose)


def thompson(tasks: BanditTrials) -> torch.Tensor:
    """Thompson sampling: the best arm of one draw from the posterior."""
    return _with_seed(tasks, lambda t, w, lo: Beta(w + 1, lo + 1).sample().argmax(1))


def optimistic_thompson(tasks: BanditTrials, samples: int) -> torch.Tensor:
    """Duan et al.'s OTS: of ``samples`` posterior draws, the most probable one decides."""

    def choose(t: int, wins: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        posterior = Beta(wins + 1, losses + 1)
        draws = posterior.sample((samples,)).clamp(1e-6, 1 - 1e-6)  # [S, B, k]
        best = posterior.log_prob(draws).sum(-1).argmax(0)  # [B]
        return draws[best, torch.arange(draws.shape[1])].argmax(1)

    return _with_seed(tasks, choose)


@functools.lru_cache(maxsize=4)
def gittins_table(pulls: int, grid: int = GITTINS_GRID) -> torch.Tensor:
    """Finite-horizon Gittins indices ``[remaining, wins, losses]`` (``pulls + 1`` each) of a
    Bernoulli arm with a Beta(1, 1) prior, undiscounted, by dynamic programming.

    Calibration (retirement) form: with ``r`` pulls left, an arm in state (wins, losses) is
    worth its index λ when pulling it until some stopping time and retiring for λ per remaining
    pull are equally good. For every λ of a grid over [0, 1], backward induction over the
    remaining pulls gives V_r = max(λ r, p (1 + V_{r-1}(wins + 1)) + (1 - p) V_{r-1}(losses + 1));
    the index is where continuing stops beating retiring, interpolated between grid points
    (continuing minus retiring falls with slope at most -1 in λ, so it crosses zero once).
    Time grows as ``grid * pulls**3 / 3``, memory as ``grid * pulls**2``.
    """
    lam = torch.linspace(0, 1, grid + 1).view(-1, 1, 1)
    table = torch.zeros(pulls + 1, pulls + 1, pulls + 1)
    value = torch.zeros(grid + 1, pulls + 1, pulls + 1)  # no pulls left: worth nothing
    for r in range(1, pulls + 1):
        m = pulls - r + 1  # with r pulls left an arm has been pulled at most pulls - r times
        wins = torch.arange(m, dtype=torch.float32).view(-1, 1)
        p = (wins + 1) / (wins + torch.arange(m, dtype=torch.float32) + 2)
        go_on = p * (1 + value[:, 1:m + 1, :m]) + (1 - p) * value[:, :m, 1:m + 1]
        gap = go_on - lam * r  # [grid + 1, m, m], positive at λ=0, negative at λ=1
        above = (gap > 0).sum(0, keepdim=True)  # grid points where continuing wins
        before = gap.gather(0, above - 1)
        after = gap.gather(0, above.clamp(max=grid))
        table[r, :m, :m] = ((above - 1) + before / (before - after)).squeeze(0) / grid
        value = torch.maximum(go_on, lam * r)
    return table


@functools.lru_cache(maxsize=4)
def _gittins_on(pulls: int, device: torch.device) -> torch.Tensor:
    """:func:`gittins_table` on ``device``, as ``[remaining, wins * (pulls + 1) + losses]``."""
    return gittins_table(pulls).to(device).flatten(1)


def gittins(tasks: BanditTrials) -> torch.Tensor:
    """The arm of highest finite-horizon Gittins index for the pulls left (ties: the first)."""
    n = tasks.pulls
    table = _gittins_on(n, tasks.means.device)

    def choose(t: int, wins: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        state = wins.long() * (n + 1) + losses.long()
        return table[n - t][state].argmax(1)

    return play(tasks, choose)
