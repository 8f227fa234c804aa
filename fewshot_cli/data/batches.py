"""Labelled minibatches of a split's images, for the non-episodic pretraining of transfer
baselines (Chen et al. 2019, Tian et al. 2020): the same ClassStore as the episodes, drawn by
tensor indexing on the training device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewshot_cli.data.sampler import storage_device
from fewshot_cli.data.store import ClassStore
from fewshot_cli.episode import LabelledBatch
from fewshot_cli.errors import FewshotError


class BatchSampler:
    """Draws ``batch_size`` images of a split with their class index ``0..classes-1``.

    Every image is equally likely at every draw (with replacement), so each class appears as
    often as it has images, as in a shuffled data loader; drawing with replacement keeps the
    sampler's whole state in ``generator``, which checkpoints save and restore, so a resumed run
    draws the very batches an uninterrupted one would (like EpisodeSampler). Indices are drawn
    on the CPU from the seeded generator, so the batches are the same on every device.
    ``augment`` (``[M, C, H, W] -> [M, C, H, W]``, see ``data.augment``) applies to every batch.
    """

    def __init__(self, store: ClassStore, batch_size: int, device: torch.device | str = "cpu",
                 seed: int = 0, prefix: str = "train",
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FewshotError(f"{prefix}.batch_size={batch_size} must be a whole number of at "
                               "least 1 (for example 64)")
        self.batch_size, self.augment = batch_size, augment
        self.classes = store.num_classes
        self.device = torch.device(device)
        self.images = store.images.to(storage_device(store.images.nbytes, self.device))
        slots = torch.arange(store.images.shape[1])
        real = slots.unsqueeze(0) < store.counts.cpu().unsqueeze(1)  # padding slots are never drawn
        self._class_of, self._slot_of = real.nonzero(as_tuple=True)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> LabelledBatch:
        """One minibatch: images ``[batch_size, C, H, W]`` in [0, 1] and labels ``[batch_size]``."""
        pick = torch.randint(len(self._class_of), (self.batch_size,), generator=self.generator)
        where = self.images.device
        classes, slots = self._class_of[pick], self._slot_of[pick]
        images = self.images[classes.to(where), slots.to(where)].to(self.device).float().div_(255)
        if self.augment is not None:
            images = self.augment(images)
        return LabelledBatch(images=images, labels=classes.to(self.device), classes=self.classes)
