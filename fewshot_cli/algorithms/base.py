"""The interface every meta-learning algorithm implements; trainer and evaluator know only this.

``MetaAlgorithm`` is what the engine sees: a meta-training loss with metrics to log, and a
score per task for validation and test. ``FewShotAlgorithm`` is the image classifier family's
version of it, written in the field's terms (support, query, ways): subclasses implement
:meth:`FewShotAlgorithm.predict` and, where the loss is not query cross-entropy, ``loss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.draws import drawn_by
from fewshot_cli.episode import IMAGE_TASKS, Backbone, Episode, TaskShape
from fewshot_cli.errors import FewshotError


class MetaAlgorithm(nn.Module):
    """An algorithm the trainer can meta-train and the evaluator can test.

    ``meta_loss(tasks)`` returns the loss to backpropagate and detached 0-dim metric tensors
    (logged under ``train/<name>``, read only on logging steps so no step waits on the device);
    ``score(tasks)`` returns one number per task, higher is better (``score_name``). ``tasks``
    is whatever the data set's sampler yields: an :class:`Episode` for images.
    """

    #: what :meth:`score` measures, as printed by ``fewshot eval`` and logged under ``val/``
    score_name: str = "accuracy"
    #: ``device.memory_format=auto`` gives the weights the channels_last layout on the CPU
    #: unless an algorithm runs slower with it (see ``engine.runtime.memory_format_for``).
    prefers_channels_last: bool = True
    #: the kind of task it learns; ``build_algorithm`` refuses a data set of another kind
    task_kind: str = IMAGE_TASKS
    #: what ``meta_loss`` trains on: ``episodes`` (the data set's task sampler) or ``batches``
    #: (labelled minibatches of the training split, for transfer baselines; the trainer then
    #: calls ``set_base_classes(classes)`` before building the optimizer)
    trains_on: str = "episodes"

    def check_tasks(self, train: TaskShape, eval: TaskShape) -> None:
        """Raise a FewshotError when the ``train.*``/``eval.*`` task shapes cannot work with
        this model; called before any data is decoded."""

    def set_step(self, step: int) -> None:
        """The current meta-training step, before its forward passes: for schedules (MAML++
        annealing, DropBlock's ramp), advanced outside any transformed function."""

    def meta_loss(self, tasks: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The meta-training loss of one meta-batch and its metrics (detached, 0-dim)."""
        raise NotImplementedError

    def score(self, tasks: Any) -> torch.Tensor:
        """Per-task score ``[B]`` in evaluation; called under ``torch.no_grad()``."""
        raise NotImplementedError


class FewShotAlgorithm(MetaAlgorithm):
    """Wraps a plain backbone network and owns the episode logic around it.

    Subclasses implement :meth:`predict`; the default :meth:`loss` is cross-entropy of the query
    logits. The evaluator calls ``predict`` under ``torch.no_grad()``: an algorithm that needs
    gradients at test time (MAML's inner loop) turns them back on itself. Every algorithm is
    built as ``Algo(backbone=..., ways=train.ways, **algo_config)``.
    """

    #: True where the trained head fixes the number of classes (the MAML family), so evaluation
    #: and prediction must use ``train.ways`` classes.
    fixed_ways: bool = False
    #: True where a class's scores depend on which label (output position) it is given, not
    #: only on its images: a trained head whose output i is bound to label i (the MAML family,
    #: whose initialisation is symmetric over labels only in expectation over the sampler's
    #: random assignments), or a new head initialised per position (Baseline's fine-tuning).
    #: fewshot predict then averages over assignments (``predict.classify``).
    binds_classes_to_outputs: bool = False

    def __init__(self, backbone: Backbone, ways: int) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise FewshotError(f"backbone {type(backbone).__name__} does not state what the "
                               "algorithms ask of a backbone; give it task_kind, out_features, "
                               "feature_map and set_step (see fewshot_cli.episode.Backbone)")
        self.backbone = backbone
        self.ways = ways

    def check_tasks(self, train: TaskShape, eval: TaskShape) -> None:
        if self.fixed_ways and eval.ways != self.ways:
            raise FewshotError(f"eval.ways={eval.ways} differs from train.ways={self.ways}, but "
                               f"this algorithm's head has {self.ways} outputs; set eval.ways="
                               f"{self.ways} (or train a model with train.ways={eval.ways})")

    def set_step(self, step: int) -> None:
        self.backbone.set_step(step)

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        """Logits ``[B, N*Q, ways]`` for the query images of each task in the meta-batch."""
        raise NotImplementedError

    def class_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """What :meth:`predict` returned ``[..., ways]`` as a distribution over the classes:
        the softmax of logits (and of log-probabilities, which it leaves as they are)."""
        return scores.float().softmax(dim=-1)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-training loss of a meta-batch and the query logits ``[B, N*Q, ways]``."""
        logits = self.predict(episode.support, episode.support_y, episode.query, episode.ways)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), episode.query_y.flatten())
        return loss, logits

    def meta_loss(self, tasks: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with drawn_by(tasks.seeds):  # each task's random numbers are its own
            loss, logits = self.loss(tasks)
        acc = accuracy(logits.detach().float(), tasks.query_y).mean()
        return loss, {"loss": loss.detach(), "accuracy": acc}

    def score(self, tasks: Episode) -> torch.Tensor:
        logits = self.predict(tasks.support, tasks.support_y, tasks.query, tasks.ways)
        return accuracy(logits.float(), tasks.query_y)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[B]`` of logits ``[B, M, ways]`` against labels ``[B, M]``."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=-1)


def embed_episode(backbone: Backbone, support: torch.Tensor, query: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat support ``[B, M, D]`` and query ``[B, N*Q, D]`` features from one backbone pass."""
    b, m = support.shape[:2]
    images = torch.cat([support, query], dim=1).flatten(0, 1)
    features = backbone(images).flatten(1).unflatten(0, (b, -1))
    return features[:, :m], features[:, m:]
