"""What the trainer and evaluator need from a data set: a task sampler per split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.data.batches import BatchSampler
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore, unrotated
from fewshot_cli.episode import IMAGE_TASKS, TaskShape
from fewshot_cli.errors import FewshotError

SPLITS = ("train", "val", "test")


class FewShotDataset:
    """Built from ``conf/dataset/<name>.yaml``; image data sets implement :meth:`load`.

    ``load(split)`` returns that split's classes; ``load("train")`` already includes
    training-only class augmentation (Omniglot rotations); image augmentation is the
    ``augment=`` group, applied by the sampler to training episodes only. A data set of another
    kind of task (bandits) overrides :meth:`input_spec` and :meth:`sampler` instead.
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

    def class_sizes(self, split: str) -> list[int] | None:
        """The image count of each class of ``split`` where it is known without decoding (a
        reader's file listing: they override this), else None; for checking task shapes
        before any image is decoded."""
        return None

    # ---- what the data checks (fewshot_cli.data.splits) ask of an image data set

    #: where the data lives (``dataset.root``), for readers of files
    root: Path | None = None
    #: accept image files with identical content in two splits (``dataset.allow_duplicates``)
    allow_duplicates: bool = False
    #: whether a rotated class is a class of its own (characters), for ``eval.rotations``
    rotatable: bool = False
    #: pairs of splits that hold the same classes by design (Omniglot's ``minimal`` split)
    shared_splits: frozenset[tuple[str, str]] = frozenset()

    def identity(self, name: str) -> str:
        """What makes two class names the same class (a class must not be in two splits): the
        name without what a layout adds to it (a split folder, a rotation, a source zip)."""
        return unrotated(name)

    def image_path(self, split: str, name: str, index: int) -> str:
        """How a user finds image ``index`` (from 0) of class ``name`` of ``split``: its file,
        ideally."""
        return f"image {index + 1} of class {name}"

    def left_out(self) -> dict[str, int]:
        """Classes left out for having fewer than ``dataset.min_images`` images -> count."""
        return {}

    def present(self) -> bool:
        """Whether the data is where the config says, without downloading anything."""
        return True

    def details(self) -> dict[str, Any]:
        """The settings that decide the split, for the run's split.json (the root, the rule)."""
        return {}

    def sampler(self, split: str, shape: TaskShape, meta_batch: int,
                device: torch.device, seed: int = 0, prefix: str = "train",
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EpisodeSampler:
        """Tasks of ``split`` shaped by ``shape`` (``meta_batch`` of them at a time);
        ``augment`` is applied to the images of training episodes.

        Raises:
            FewshotError: ``shape.rotations`` asks for rotated classes of a data set whose
                rotated images are not other classes (photographs)."""
        store = self.load(split)
        if shape.rotations != (0,):
            if not self.rotatable:
                raise FewshotError(
                    f"eval.rotations={list(shape.rotations)} makes each rotation of a class a "
                    f"class of its own, which only character data sets (omniglot, glyphs) "
                    f"have; remove it (eval.rotations=[0])")
            store = store.rotated(list(shape.rotations), "eval.rotations")
        return EpisodeSampler(store, shape.ways, shape.shots, shape.queries,
                              meta_batch, device, seed=seed, split=split, prefix=prefix,
                              augment=augment, within_group=shape.within_group,
                              distinct_drawers=shape.distinct_drawers)

    def batches(self, split: str, batch_size: int, device: torch.device, seed: int = 0,
                prefix: str = "train",
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BatchSampler:
        """Labelled minibatches of ``split``'s images (every class of the split, global labels)
        for the pretraining of transfer baselines; ``augment`` is applied to every batch."""
        return BatchSampler(self.load(split), batch_size, device, seed=seed, prefix=prefix,
                            augment=augment)

    def describe(self, shape: TaskShape) -> str:
        """The task shape in words, as printed and as part of a result's key in results.json:
        ``20-way 1-shot (5 queries), within group, distinct drawers``."""
        return shape.describe()

    def baselines(self, tasks: Any) -> dict[str, torch.Tensor]:
        """Per-task scores of classical methods on the same test tasks (none for images)."""
        return {}
