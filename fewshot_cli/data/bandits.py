"""Multi-armed Bernoulli bandits (Duan et al. 2016, section 3.1): the tasks of RL².

A task is a bandit of ``arms`` arms whose means are drawn from Uniform[0, 1]; a trial is
``pulls`` pulls of it. Whole meta-batches are drawn as tensors and every trial's luck is drawn
with it (see :class:`BanditTrials`), so the environment is a tensor operation over all instances
at once, on the CPU or the GPU. The classical bandit algorithms are scored on the very same
fixed test trials (:meth:`Bandits.baselines`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fewshot_cli.data import bandit_policies as policies
from fewshot_cli.data.augment import Identity
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.episode import BANDIT_TASKS, BanditTrials, TaskShape
from fewshot_cli.errors import FewshotError


def stream_seed(split: str, seed: int) -> int:
    """A seed per (split, seed): training, validation and test trials never coincide."""
    return int(hashlib.sha256(f"bandits/{split}/{seed}".encode()).hexdigest()[:15], 16)


class BanditSampler:
    """Draws meta-batches of trials from a seeded generator on the CPU (the same trials on every
    device), then moves them to ``device``."""

    def __init__(self, arms: int, pulls: int, meta_batch: int, device: torch.device | str,
                 seed: int = 0, split: str = "train") -> None:
        self.arms, self.pulls, self.meta_batch, self.split = arms, pulls, meta_batch, split
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(stream_seed(split, seed))

    def _draw(self, g: torch.Generator, b: int) -> tuple[torch.Tensor, int]:
        """Uniform numbers ``[b, arms + 2 pulls]`` (means, draws, choices) and a seed."""
        numbers = torch.rand(b, self.arms + 2 * self.pulls, generator=g)
        return numbers, int(torch.randint(0, 2**62, (1,), generator=g))

    def _trials(self, numbers: torch.Tensor, seed: int) -> BanditTrials:
        k, n = self.arms, self.pulls
        numbers = numbers.to(self.device)
        return BanditTrials(means=numbers[:, :k], draws=numbers[:, k:k + n],
                            choices=numbers[:, k + n:], seed=seed)

    def sample(self) -> BanditTrials:
        """``meta_batch`` new random trials."""
        return self._trials(*self._draw(self.generator, self.meta_batch))

    def fixed(self, episodes: int, seed: int, batch: int | None = None) -> Iterator[BanditTrials]:
        """``episodes`` trials, identical for the same seed whatever ``batch`` groups them (each
        is drawn on its own; only Thompson sampling's posterior draws follow the grouping)."""
        g = torch.Generator().manual_seed(stream_seed(self.split, seed))
        draws = [self._draw(g, 1) for _ in range(episodes)]
        batch = batch or self.meta_batch
        for start in range(0, episodes, batch):
            chunk = draws[start:start + batch]
            yield self._trials(torch.cat([n for n, _ in chunk]), chunk[0][1])


def _require(key: str, value: Any, kind: type, ok: Callable[[Any], bool], words: str,
             example: str) -> None:
    """Raise one sentence naming ``dataset.<key>`` unless ``value`` is a ``kind`` that is ``ok``."""
    typed = isinstance(value, kind) or kind is float and isinstance(value, int)
    if isinstance(value, bool) or not typed or not ok(value):
        raise FewshotError(f"dataset.{key}={value} must be {words}; for example "
                           f"dataset.{key}={example}")


class Bandits(FewShotDataset):
    """Bernoulli bandits with ``arms`` arms (k) and ``pulls`` pulls per trial (n); arm means
    from Uniform[0, 1]. ``epsilon``, ``ucb_c`` and ``ots_samples`` set the baselines' parameters;
    the Gittins index table is computed for ``pulls <= gittins_max_pulls`` (its cost grows as
    ``pulls**3``)."""

    task_kind = BANDIT_TASKS

    def __init__(self, arms: int = 5, pulls: int = 10, epsilon: float = 0.0, ucb_c: float = 0.1,
                 ots_samples: int = 32, gittins_max_pulls: int = 200) -> None:
        _require("arms", arms, int, lambda v: v >= 2, "a whole number of at least 2 (a bandit "
                 "with one arm leaves nothing to choose)", "5")
        _require("pulls", pulls, int, lambda v: v >= 1, "a whole number of at least 1 (the pulls "
                 "of one trial)", "10")
        _require("epsilon", epsilon, float, lambda v: 0 <= v <= 1, "a probability between 0 "
                 "and 1", "0.1")
        _require("ucb_c", ucb_c, float, lambda v: v >= 0, "a number of at least 0", "0.2")
        _require("ots_samples", ots_samples, int, lambda v: v >= 1, "a whole number of at "
                 "least 1", "2")
        _require("gittins_max_pulls", gittins_max_pulls, int, lambda v: v >= 0, "a whole number "
                 "of at least 0", "200")
        self.arms, self.pulls = arms, pulls
        self.epsilon, self.ucb_c, self.ots_samples = float(epsilon), float(ucb_c), ots_samples
        self.gittins_max_pulls = gittins_max_pulls

    def input_spec(self) -> dict[str, Any]:
        return {"arms": self.arms}

    def sampler(self, split: str, shape: TaskShape | None, meta_batch: int,
                device: torch.device, seed: int = 0, prefix: str = "train",
                augment: torch.nn.Module | None = None) -> BanditSampler:
        """Trials of this bandit; ``shape`` (the image task shape) does not apply, nor does an
        image ``augment=`` (refused in one sentence)."""
        if augment is not None and not isinstance(augment, Identity):
            raise FewshotError("augment= transforms images and bandit trials hold none; leave "
                               "augment= out (augment=none) with dataset=bandits")
        rotations = tuple(getattr(shape, "rotations", (0,)))  # callers may pass no TaskShape
        if rotations != (0,):
            raise FewshotError(f"eval.rotations={list(rotations)} rotates image classes "
                               "and bandit trials hold none; leave it out with dataset=bandits")
        return BanditSampler(self.arms, self.pulls, meta_batch, device, seed=seed, split=split)

    def describe(self, shape: TaskShape | None) -> str:
        return f"{self.arms}-armed Bernoulli bandit, {self.pulls} pulls"

    def baselines(self, tasks: BanditTrials) -> dict[str, torch.Tensor | None]:
        """Total reward per trial ``[B]`` of the classical algorithms of Duan et al.'s Table 1,
        in its order; Gittins is None (shown as "—") beyond ``gittins_max_pulls``."""
        gittins = policies.gittins(tasks) if self.pulls <= self.gittins_max_pulls else None
        return {"random": policies.random(tasks), "Gittins": gittins,
                "TS": policies.thompson(tasks),
                "OTS": policies.optimistic_thompson(tasks, self.ots_samples),
                "UCB1": policies.ucb1(tasks, self.ucb_c),
                "epsilon-greedy": policies.epsilon_greedy(tasks, self.epsilon),
                "greedy": policies.greedy(tasks)}
