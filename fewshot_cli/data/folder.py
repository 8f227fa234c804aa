"""Your own images (``dataset=folder``): any folder of class folders, no code and no file to add.

Layouts under ``dataset.root`` (any format PIL opens, any size; hidden files are skipped):

* ``<class>/<images>`` — one folder per class;
* ``<group>/<class>/<images>`` — class folders nested one level in a parent folder, which is the
  class's group (for ``eval.within_group``); both kinds may sit side by side;
* ``train/ val/ test/`` each holding class folders as above — the split is then the folders'.

Without split folders the classes are split by ``dataset.classes`` (explicit lists, class names
as ``<class>`` or ``<group>/<class>``) or else by ``dataset.split_fractions`` (default 0.6/0.2/
0.2): classes are ordered by a hash of ``dataset.seed`` and their name and cut at those
fractions, so adding a class moves at most the classes next to the cuts. Classes with fewer than
``dataset.min_images`` images are left out (one warning says how many). Images are squashed to
``dataset.image_size`` squared; ``dataset.channels`` is 1 or 3, by default 1 when every image is
grey, else 3. The whole folder is decoded once and cached; the split used is written into the
run folder as ``split.json`` (see :mod:`fewshot_cli.data.splits`). A class folder of the same
name under two of train/, val/ and test/ is one class in two splits, which is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

from fewshot_cli.data.base import SPLITS, FewShotDataset
from fewshot_cli.data.images import RESAMPLE, decode_files, fingerprint, list_images
from fewshot_cli.data.store import ClassStore, cache_file, cached_store
from fewshot_cli.errors import FewshotError

log = logging.getLogger(__name__)

LAYOUT = ("<class>/<images>, <group>/<class>/<images>, or train/, val/ and test/ folders holding "
          "those")
MODES = {None: "auto", 1: "L", 3: "RGB"}


def _folders(folder: Path) -> list[Path]:
    return [folder / n for n in sorted(e.name for e in os.scandir(folder)
                                       if e.is_dir() and not e.name.startswith("."))]


def list_tree(folder: Path, prefix: str = "") -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Classes under ``folder`` (``<class>/`` or ``<group>/<class>/``): class name -> image files
    and class name -> group (the parent folder, ``.`` for a class at the top)."""
    files: dict[str, list[Path]] = {}
    groups: dict[str, str] = {}
    for sub in _folders(folder):
        images = list_images(sub)
        nested = {c.name: list_images(c) for c in _folders(sub)}
        nested = {n: found for n, found in nested.items() if found}
        if images and nested:
            raise FewshotError(f"{sub} holds both images and class folders; keep either the "
                               "images of one class or class folders in it")
        if images:
            files[prefix + sub.name] = images
            groups[prefix + sub.name] = prefix + "."
        for name, found in nested.items():
            files[f"{prefix}{sub.name}/{name}"] = found
            groups[f"{prefix}{sub.name}/{name}"] = prefix + sub.name
    return files, groups


def hash_order(names: Sequence[str], seed: int) -> list[str]:
    """``names`` in an order fixed by ``seed`` and each name alone (not by the others)."""
    key = lambda n: hashlib.sha256(f"{seed}/{n}".encode()).hexdigest()
    return sorted(names, key=key)


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Class counts per split closest to ``fractions`` of ``n`` (largest remainders), giving
    each split with a non-zero fraction at least one class while others have more than one."""
    sizes = [int(f * n) for f in fractions]
    by_remainder = sorted(range(len(sizes)), key=lambda i: sizes[i] - fractions[i] * n)
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    for i, f in enumerate(fractions):
        largest = max(range(len(sizes)), key=lambda j: sizes[j])
        if f > 0 and sizes[i] == 0 and sizes[largest] > 1:
            sizes[i], sizes[largest] = 1, sizes[largest] - 1
    return sizes


class Folder(FewShotDataset):
    """A folder of class folders as a uint8 store ``[classes, max_images, C, S, S]`` per split."""

    def __init__(self, root: str, image_size: int = 84, channels: int | None = None,
                 split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
                 classes: Mapping | None = None, min_images: int = 5, seed: int = 0,
                 allow_duplicates: bool = False) -> None:
        if root is None:
            raise FewshotError(f"dataset.root is not set; point it at your images ({LAYOUT})")
        for key, value in (("image_size", image_size), ("min_images", min_images)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FewshotError(f"dataset.{key}={value} must be a positive integer")
        if channels not in MODES:
            raise FewshotError(f"dataset.channels={channels} must be 1, 3 or null (from the "
                               "images)")
        fractions = [float(f) for f in split_fractions]
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise FewshotError(f"dataset.split_fractions={list(split_fractions)} must be three "
                               "fractions (train, val, test) that sum to 1, e.g. [0.6,0.2,0.2]")
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size, self.channels, self.min_images = image_size, channels, min_images
        self.fractions, self.seed = fractions, int(seed)
        self.allow_duplicates = bool(allow_duplicates)
        self.classes = self._check_classes(classes) if classes is not None else None
        self._store: ClassStore | None = None

    @staticmethod
    def _check_classes(classes: Mapping) -> dict[str, list[str]]:
        if any(s not in classes for s in SPLITS):
            raise FewshotError("dataset.classes needs lists for train, val and test; set "
                               "dataset.classes={train: [...], val: [...], test: [...]}")
        chosen = {s: [str(c) for c in classes[s]] for s in SPLITS}
        seen: dict[str, str] = {}
        for split in SPLITS:
            for c in chosen[split]:
                if c in seen:
                    raise FewshotError(f"dataset.classes lists {c} in both {seen[c]} and "
                                       f"{split}; a class belongs to one split")
                seen[c] = split
        return chosen

    # ---- what is on disk (CUB overrides images_root and split_rule)

    def images_root(self) -> Path:
        """The folder holding the classes (or the train/val/test folders)."""
        if not self.root.is_dir():
            raise FewshotError(f"dataset.root={self.root} is not a folder; point it at your "
                               f"images ({LAYOUT})")
        return self.root

    @cached_property
    def split_folders(self) -> bool:
        """Whether the images come as train/, val/ and test/ folders."""
        return all((self.images_root() / s).is_dir() for s in SPLITS)

    @cached_property
    def listing(self) -> tuple[dict[str, list[Path]], dict[str, str], dict[str, int]]:
        """Kept classes -> image files, class -> group, and left-out class -> image count."""
        root = self.images_root()
        present = [s for s in SPLITS if (root / s).is_dir()]
        if present and len(present) < len(SPLITS):
            missing = [s for s in SPLITS if s not in present]
            raise FewshotError(f"{root} has {'/, '.join(present)}/ but no {'/, '.join(missing)}/ "
                               "folder; add it, or put the class folders directly in "
                               "dataset.root to have them split by dataset.split_fractions")
        files: dict[str, list[Path]] = {}
        groups: dict[str, str] = {}
        for prefix in [f"{s}/" for s in present] or [""]:
            found, grouped = list_tree(root / prefix if prefix else root, prefix)
            files.update(found)
            groups.update(grouped)
        if not files:
            raise FewshotError(f"no images found in {root}; dataset=folder reads {LAYOUT} (any "
                               "format PIL opens)")
        small = {n: len(f) for n, f in files.items() if len(f) < self.min_images}
        if len(small) == len(files):
            most = max(small.values())
            raise FewshotError(f"every class in {root} has fewer than dataset.min_images="
                               f"{self.min_images} images (the largest has {most}); add images "
                               f"or set dataset.min_images={most}")
        if small:
            shown = ", ".join(f"{n} ({k})" for n, k in list(small.items())[:5])
            log.warning("left out %d of %d classes with fewer than dataset.min_images=%d images: "
                        "%s%s", len(small), len(files), self.min_images, shown,
                        ", ..." if len(small) > 5 else "")
        kept = {n: f for n, f in files.items() if n not in small}
        return kept, {n: groups[n] for n in kept}, small

    def split_rule(self, names: list[str]) -> dict[str, list[str]]:
        """The class names of each split: split folders, dataset.classes, or the fractions."""
        if self.split_folders:
            return {s: [n for n in names if n.split("/", 1)[0] == s] for s in SPLITS}
        if self.classes is not None:
            unknown = [c for s in SPLITS for c in self.classes[s] if c not in names]
            if unknown:
                raise FewshotError(f"dataset.classes names {', '.join(unknown[:5])}, not a class "
                                   f"folder with at least dataset.min_images={self.min_images} "
                                   f"images in {self.root}; choose from "
                                   f"{', '.join(names[:20])}")
            return self.classes
        order = hash_order(names, self.seed)
        sizes = split_sizes(len(order), self.fractions)
        return {"train": order[: sizes[0]], "val": order[sizes[0] : sizes[0] + sizes[1]],
                "test": order[sizes[0] + sizes[1] :]}

    @cached_property
    def splits(self) -> dict[str, list[str]]:
        """The classes of each split, checked to be non-empty."""
        files, _, _ = self.listing
        chosen = self.split_rule(list(files))
        for split in SPLITS:
            if not chosen[split]:
                raise FewshotError(f"the {split} split of {self.root} has no class (of "
                                   f"{len(files)} with at least dataset.min_images="
                                   f"{self.min_images} images); add class folders or change "
                                   "dataset.split_fractions or dataset.classes")
        return chosen

    # ---- decoding, once for the whole folder

    def store(self) -> ClassStore:
        """Every kept class of the folder, decoded once per size and channels, then cached."""
        if self._store is None:
            files, groups, _ = self.listing
            root = self.images_root()
            key = {"reader": "folder", "image_size": self.image_size,
                   "channels": self.channels or "auto", "resample": RESAMPLE,
                   "fingerprint": fingerprint(files, "the image {path} (class {cls}) is gone; "
                                              "restore it or run again", relative_to=root)}

            def build() -> ClassStore:
                log.info("decoding %d classes of %s at %d px once (cached for later runs)",
                         len(files), root, self.image_size)
                return decode_files(files, self.image_size, MODES[self.channels])

            store = cached_store(cache_file(root, key), build)
            top_only = all(g.rsplit("/", 1)[-1] == "." for g in groups.values())
            self._store = replace(store, groups=None if top_only else
                                  [groups[n] for n in store.names])
        return self._store

    def input_spec(self) -> dict[str, Any]:
        """The backbone's input: ``dataset.channels``, or (when null) what the images hold, which
        takes decoding the training classes first."""
        channels = self.channels or self.load("train").channels
        return {"in_channels": channels, "image_size": self.image_size}

    def load(self, split: str) -> ClassStore:
        """The classes of ``split`` (train/val/test)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.store().select(self.splits[split])

    def class_sizes(self, split: str) -> list[int]:
        """From the listing, before any image is decoded (an undecodable file counts)."""
        files = self.listing[0]
        return [len(files[name]) for name in self.splits[split]]

    # ---- what the data checks ask (see FewShotDataset)

    def identity(self, name: str) -> str:
        """The class name without its split folder: train/x and test/x are one class."""
        return name.split("/", 1)[1] if self.split_folders else name

    def image_path(self, split: str, name: str, index: int) -> str:
        return str(self.listing[0][name][index])

    def left_out(self) -> dict[str, int]:
        return self.listing[2]

    def present(self) -> bool:
        return self.root.is_dir()

    def details(self) -> dict[str, Any]:
        """The root and the rule that split it (split.json)."""
        how = "folders" if self.split_folders else (
            "dataset.classes" if self.classes is not None else "dataset.split_fractions")
        channels = self._store.channels if self._store is not None else self.channels
        return {"root": str(self.root), "split_by": how, "seed": self.seed,
                "split_fractions": self.fractions, "min_images": self.min_images,
                "channels": channels, "image_size": self.image_size}
