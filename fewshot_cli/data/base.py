"""What the trainer and evaluator need from a data set: a task sampler per split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore
from fewshot_cli.episode import IMAGE_TASKS

SPLITS = ("train", "val", "test")


class FewShotDataset:
    """Built from ``conf/dataset/<name>.yaml``; image data sets implement :meth:`load`.

    ``load(split)`` returns that split's classes; ``load("train")`` already includes
    training-only class augmentation (Omniglot rotations). ``train_transform`` (optional) is
    applied on the device to the float images of training episodes only,
    ``[M, C, H, W] -> [M, C, H, W]``; evaluation never sees it. A data set of another kind of
    task (bandits) overrides :meth:`input_spec` and :meth:`sampler` instead.
    """

    channels: int = 1
    image_size: int = 28
    #: the kind of task it holds; only an algorithm and a backbone of the same kind can learn it
    task_kind: str = IMAGE_TASKS

    def input_spec(self) -> dict[str, Any]:
        """Keyword arguments of the backbone that the data fixes, known before any decoding."""
        return {"in_channels": self.channels, "image_size": self.image_size}

    def load(self, split: str) -> ClassStore:
        raise NotImplementedError

    def train_transform(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def sampler(self, split: str, shape: Mapping[str, Any], meta_batch: int,
                device: torch.device, seed: int = 0, prefix: str = "train") -> EpisodeSampler:
        """Tasks of ``split`` shaped by ``shape`` (the ``train`` or ``eval`` section)."""
        return EpisodeSampler(self.load(split), shape["ways"], shape["shots"], shape["queries"],
                              meta_batch, device, seed=seed, split=split, prefix=prefix,
                              transform=self.train_transform if split == "train" else None)

    def describe(self, shape: Mapping[str, Any]) -> str:
        """The task shape in words, as printed and as part of a result's key in results.json."""
        return f"{shape['ways']}-way {shape['shots']}-shot ({shape['queries']} queries)"

    def baselines(self, tasks: Any) -> dict[str, torch.Tensor]:
        """Per-task scores of classical methods on the same test tasks (none for images)."""
        return {}
