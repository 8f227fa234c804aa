"""What the trainer and evaluator need from a data set: one ClassStore per split."""

from __future__ import annotations

from pathlib import Path

from fewshot_cli.data.store import ClassStore

SPLITS = ("train", "val", "test")


class FewShotDataset:
    """Built from ``conf/dataset/<name>.yaml``; ``load(split)`` returns that split's classes.

    ``load("train")`` already includes training-only class augmentation (Omniglot rotations);
    image augmentation is the ``augment=`` group, applied by the sampler.
    """

    def load(self, split: str) -> ClassStore:
        raise NotImplementedError

    def record(self, run_dir: Path) -> None:
        """Write what the run needs to know about the data into its folder (the folder reader
        writes the split it chose); nothing by default."""
