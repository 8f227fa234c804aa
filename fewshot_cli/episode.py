"""The currencies of data, algorithms and engine: ``Episode`` (a meta-batch of few-shot image
tasks), ``BanditTrials`` (a meta-batch of multi-armed bandit tasks), ``TaskShape`` (the shape
of the tasks a model meets) and ``Backbone`` (what algorithms may ask of a network).

Ground floor: imports nothing of fewshot, so algorithms, engine and data all import it downward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

#: the kinds of task (``task_kind`` of data sets, algorithms and backbones): a data set is only
#: paired with an algorithm and a backbone of its own kind
IMAGE_TASKS = "few-shot image classification"
BANDIT_TASKS = "multi-armed bandit"


@runtime_checkable
class Backbone(Protocol):
    """What the image algorithms may ask of a backbone, a plain ``nn.Module`` that maps images
    ``[M, C, H, W]`` to features ``[M, out_features]`` or to feature maps ``[M, *feature_map]``.

    ``task_kind``: :data:`IMAGE_TASKS`. ``out_features``: values per image in the output (a
    map's flattened size). ``feature_map``: ``(C, h, w)``, the map the output is or flattens;
    None where pooling or a dense layer removed it (Relation Networks need one). ``set_step``:
    the meta-training step, told before the step's forward passes; layers whose behaviour
    follows training (DropBlock's ramp) change their state there, never inside ``forward``,
    which the inner loop runs under ``torch.func`` transforms (see
    ``fewshot_cli.algorithms.inner_loop``). Every backbone of ``conf/backbone`` states it.
    """

    task_kind: str
    out_features: int
    feature_map: tuple[int, int, int] | None

    def set_step(self, step: int) -> None:
        """The current meta-training step."""
        ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, C, H, W]`` images to ``[M, out_features]`` or ``[M, *feature_map]``."""
        ...


@dataclass(frozen=True)
class TaskShape:
    """The tasks a model is trained or tested on: ``ways`` classes of ``shots`` support and
    ``queries`` query images each, ``meta_batch`` tasks at a time (``train.*``, ``eval.*``);
    ``within_group``/``distinct_drawers`` choose Lake et al.'s protocol (Omniglot: the classes
    of a task from one alphabet, its support and queries by different drawers); ``rotations``
    (degrees) make each rotation of a class a class of its own, as Snell et al. and Vinyals et
    al. test Omniglot (423 test characters x 4 = 1692 classes); ``(0,)``: the classes as they
    are."""

    ways: int
    shots: int
    queries: int
    meta_batch: int = 1
    within_group: bool = False
    distinct_drawers: bool = False
    rotations: tuple[int, ...] = (0,)

    def describe(self) -> str:
        """In words, as printed and as part of a result's key in results.json:
        ``20-way 1-shot (5 queries), within group, distinct drawers``."""
        protocol = "".join(f", {words}" for words, on in (
            ("within group", self.within_group), ("distinct drawers", self.distinct_drawers))
            if on)
        if self.rotations != (0,):
            protocol += f", classes rotated by {'/'.join(map(str, self.rotations))} degrees"
        return f"{self.ways}-way {self.shots}-shot ({self.queries} queries){protocol}"


@dataclass
class Episode:
    """A meta-batch of ``B`` few-shot tasks (``N`` ways, ``K`` shots, ``Q`` queries per class).

    support ``float [B, N*K, C, H, W]``, support_y ``long [B, N*K]``,
    query ``float [B, N*Q, C, H, W]``, query_y ``long [B, N*Q]``; labels run 0..N-1 and
    images are ordered class by class (``support_y[b] == [0]*K + [1]*K + ...``).
    """

    support: torch.Tensor
    support_y: torch.Tensor
    query: torch.Tensor
    query_y: torch.Tensor
    ways: int
    shots: int
    queries: int
    seeds: torch.Tensor | None = None

    @property
    def meta_batch(self) -> int:
        return self.support.shape[0]

    def to(self, device: torch.device | str) -> Episode:
        return replace(
            self,
            support=self.support.to(device),
            support_y=self.support_y.to(device),
            query=self.query.to(device),
            query_y=self.query_y.to(device),
        )


@dataclass
class BanditTrials:
    """A meta-batch of ``B`` Bernoulli bandit tasks, each one trial of ``n`` pulls of ``k`` arms.

    means ``float [B, k]``: each arm's chance of paying 1. draws ``float [B, n]``: the
    environment's uniform numbers, pull ``t`` of arm ``a`` pays 1 exactly when
    ``draws[b, t] < means[b, a]``, so every method meets the very same luck on the same tasks.
    choices ``float [B, n]``: uniform numbers for a policy's own random choice at each pull
    (sampling an action, an epsilon-greedy coin). seed: for methods that need more randomness
    (Thompson sampling draws from the posterior). Everything random about a trial is in the
    task, so scores are reproducible and training resumes exactly.
    """

    means: torch.Tensor
    draws: torch.Tensor
    choices: torch.Tensor
    seed: int

    @property
    def meta_batch(self) -> int:
        return self.means.shape[0]

    @property
    def arms(self) -> int:
        return self.means.shape[1]

    @property
    def pulls(self) -> int:
        return self.draws.shape[1]

    def pull(self, t: int, arm: torch.Tensor) -> torch.Tensor:
        """The rewards ``float [B]`` (0 or 1) of pulling ``arm`` ``long [B]`` at pull ``t``."""
        return (self.draws[:, t] < self.means.gather(1, arm.unsqueeze(1)).squeeze(1)).float()

    def to(self, device: torch.device | str) -> BanditTrials:
        return replace(self, means=self.means.to(device), draws=self.draws.to(device),
                       choices=self.choices.to(device))


@dataclass
class LabelledBatch:
    """A minibatch of ``M`` images of the base classes with their global labels, for the
    non-episodic pretraining of transfer baselines (Chen et al. 2019; Tian et al. 2020).

    images ``float [M, C, H, W]`` in [0, 1]; labels ``long [M]``, each image's class index in
    its split (0..classes-1); classes: how many classes the split holds. seeds ``long [M]``:
    each image's seed for the random layers it meets (see ``Episode``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: int
    seeds: torch.Tensor | None = None
