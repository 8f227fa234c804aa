"""The in-memory class store: every image of a split, decoded once, as one uint8 tensor."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_torch_save, write_failure

CACHE_VERSION = 1

log = logging.getLogger(__name__)


@dataclass
class ClassStore:
    """Images of one split grouped by class.

    ``images`` is ``uint8 [classes, max_images, C, H, W]``; class ``c`` owns the first
    ``counts[c]`` rows (the rest is padding when classes have different image counts).
    ``groups`` (optional) names each class's group: Omniglot's alphabet, a folder's parent
    folder; episodes can then be drawn within one group. ``drawers`` (optional, ``long
    [classes, max_images]``, -1 where unknown) says who made each image (Omniglot's drawer),
    so that support and query images can come from different people.
    """

    images: torch.Tensor
    names: list[str]
    counts: torch.Tensor | None = None
    groups: list[str] | None = None
    drawers: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError("ClassStore.images must be uint8 [classes, images, C, H, W]")
        if len(self.names) != self.images.shape[0]:
            raise ValueError("ClassStore needs one name per class")
        if self.counts is None:
            rows, per_class = self.images.shape[:2]
            self.counts = torch.full((rows,), per_class, dtype=torch.long)
        if self.groups is not None and len(self.groups) != len(self.names):
            raise ValueError("ClassStore needs one group per class")
        if self.drawers is not None and self.drawers.shape != self.images.shape[:2]:
            raise ValueError("ClassStore.drawers must be long [classes, max_images]")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[2]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def min_images(self) -> int:
        return int(self.counts.min()) if self.num_classes else 0

    def select(self, names: list[str]) -> ClassStore:
        """The sub-store holding the named classes, in the given order."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise FewshotError(f"unknown classes requested: {', '.join(missing[:5])}")
        rows = torch.tensor([index[n] for n in names], dtype=torch.long)
        groups = [self.groups[i] for i in rows.tolist()] if self.groups is not None else None
        drawers = self.drawers[rows] if self.drawers is not None else None
        return ClassStore(self.images[rows], list(names), self.counts[rows], groups, drawers)

    @staticmethod
    def concat(stores: list[ClassStore]) -> ClassStore:
        """All classes of several stores (same image shape) in one store.

        Groups and drawers are kept only when every store has them.
        """
        width = max(s.images.shape[1] for s in stores)
        padded = [
            torch.nn.functional.pad(s.images, (0, 0, 0, 0, 0, 0, 0, width - s.images.shape[1]))
            for s in stores
        ]
        groups = None
        if all(s.groups is not None for s in stores):
            groups = [g for s in stores for g in s.groups]
        drawers = None
        if all(s.drawers is not None for s in stores):
            drawers = torch.cat([torch.nn.functional.pad(s.drawers, (0, width - s.images.shape[1]),
                                                         value=-1) for s in stores])
        return ClassStore(
            torch.cat(padded),
            [n for s in stores for n in s.names],
            torch.cat([s.counts for s in stores]),
            groups,
            drawers,
        )

    def rotated(self, degrees: list[int]) -> ClassStore:
        """Each rotation by a multiple of 90 degrees becomes a class of its own (Omniglot x4)."""
        if not degrees or list(degrees) == [0]:
            return self
        for d in degrees:
            if d % 90:
                raise FewshotError(f"rotations must be multiples of 90 degrees, got {d}")
        parts = [torch.rot90(self.images, (d // 90) % 4, dims=(-2, -1)) for d in degrees]
        names = [f"{n}/rot{d:03d}" for d in degrees for n in self.names]
        # a rotated character keeps its alphabet and its drawers
        groups = self.groups * len(degrees) if self.groups is not None else None
        drawers = self.drawers.repeat(len(degrees), 1) if self.drawers is not None else None
        return ClassStore(torch.cat(parts), names, self.counts.repeat(len(degrees)), groups,
                          drawers)

    def save(self, path: Path) -> None:
        """Write the store atomically (a reader never sees half a file)."""
        payload = {"version": CACHE_VERSION, "images": self.images, "names": self.names,
                   "counts": self.counts}
        # optional fields, absent from caches written before they existed: same cache version
        if self.groups is not None:
            payload["groups"] = list(self.groups)
        if self.drawers is not None:
            payload["drawers"] = self.drawers
        atomic_torch_save(payload, path)

    @staticmethod
    def load(path: Path, mmap: bool = True) -> ClassStore:
        """Read a store written by :meth:`save`; the image tensor is memory-mapped."""
        payload = torch.load(path, mmap=mmap, weights_only=True)
        if payload.get("version") != CACHE_VERSION:
            raise ValueError(f"{path} was written by another cache version")
        groups = payload.get("groups")
        return ClassStore(payload["images"], list(payload["names"]), payload["counts"],
                          list(groups) if groups is not None else None, payload.get("drawers"))


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fewshot`` (``~/.cache/fewshot`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewshot"


def cache_file(data_root: Path, key: dict) -> Path:
    """Where the decoded cache for ``key`` lives: next to the data, or in the user cache.

    The key (reader name, source files, image size...) is hashed into the file name, so a
    change of any of them builds a new cache instead of reading a stale one.
    """
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key.get('reader', 'store')}-{digest}.pt"
    beside = Path(data_root) / ".fewshot-cache"
    try:
        if beside.is_dir() or _writable(Path(data_root)):
            beside.mkdir(parents=True, exist_ok=True)
            if _writable(beside):
                return beside / name
    except OSError:
        pass
    return user_cache_dir() / "stores" / name


def _writable(folder: Path) -> bool:
    """We may write into ``folder`` and it is not marked read-only (root could, but must not)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def cached_store(path: Path, build: Callable[[], ClassStore]) -> ClassStore:
    """Load the store cached at ``path``, building and saving it first when absent or stale."""
    if path.exists():
        try:
            return ClassStore.load(path)
        except Exception:  # a cache from another version or a torn copy: rebuild it
            path.unlink(missing_ok=True)
    store = build()
    try:
        store.save(path)
    except (OSError, RuntimeError) as err:  # a full or read-only disk: run without the cache
        log.warning("%s; continuing without it", write_failure(path, err, "no cache was kept"))
        return store
    return ClassStore.load(path)
