"""What the trainer and evaluator need from a data set: one ClassStore per split."""

from __future__ import annotations

import torch

from fewshot_cli.data.store import ClassStore

SPLITS = ("train", "val", "test")


class FewShotDataset:
    """Built from ``conf/dataset/<name>.yaml``; ``load(split)`` returns that split's classes.

    ``load("train")`` already includes training-only class augmentation (Omniglot rotations).
    ``train_transform`` (optional) is applied on the device to the float images of training
    episodes only, ``[M, C, H, W] -> [M, C, H, W]``; evaluation never sees it.
    """

    def load(self, split: str) -> ClassStore:
        raise NotImplementedError

    def train_transform(self, images: torch.Tensor) -> torch.Tensor:
        return images
