"""The in-memory class store: every image of a split, decoded once, as one uint8 tensor."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_torch_save, write_failure
from fewshot_cli.options import QUARTER_TURNS, check_value

# 2: images seen as a viewer shows them (transparency over white, 16-bit grey scaled), each
# image's content digest and origin, and a checksum of the whole store; 3: EXIF orientation
# applied, JPEGs decoded at full scale, one Lanczos resize for every layout (pickles too)
CACHE_VERSION = 3
CACHE_ENV = "FEWSHOT_CACHE"  # a folder for every decoded cache instead of beside the data

log = logging.getLogger(__name__)
ROTATED = "rot{:03d}"  # the last part of a rotated class's name: <class>/rot090


def quarter_turns(degrees: Sequence[int], key: str = "dataset.rotations") -> list[int]:
    """``degrees`` as a list of ints once checked to name each quarter turn once, from 0 to
    270 (``[0,360]`` would make two classes of every character).

    Raises:
        FewshotError: one sentence naming ``key``, what it must be and an example."""
    check_value(key, degrees, QUARTER_TURNS)
    return [int(d) for d in degrees]


def unrotated(name: str) -> str:
    """The class a rotated class (``<class>/rot090``, see :meth:`ClassStore.rotated`) came from;
    any other name as it is."""
    base, _, last = name.rpartition("/")
    return base if base and re.fullmatch(r"rot\d{3}", last) else name


@dataclass
class ClassStore:
    """Images of one split grouped by class.

    ``images`` is ``uint8 [classes, max_images, C, H, W]``; class ``c`` owns the first
    ``counts[c]`` rows (the rest is padding when classes have different image counts).
    ``groups`` (optional) names each class's group: Omniglot's alphabet, a folder's parent
    folder; episodes can then be drawn within one group. ``drawers`` (optional, ``long
    [classes, max_images]``, -1 where unknown) says who made each image (Omniglot's drawer),
    so that support and query images can come from different people. ``digests`` (optional,
    ``long [classes, max_images]``, 0 in the padding) hashes each image's source pixels, for
    the duplicate checks and the split record; ``origin`` (optional, ``int32 [classes,
    max_images, 4]``) holds each source file's mode code, width, height and flags (see
    ``images.as_seen``). ``partial``: some files could not be decoded (``fewshot data``), so
    the store is never cached.
    """

    images: torch.Tensor
    names: list[str]
    counts: torch.Tensor | None = None
    groups: list[str] | None = None
    drawers: torch.Tensor | None = None
    digests: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    partial: bool = False

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
        if self.digests is not None and self.digests.shape != self.images.shape[:2]:
            raise ValueError("ClassStore.digests must be long [classes, max_images]")
        if self.origin is not None and self.origin.shape != (*self.images.shape[:2], 4):
            raise ValueError("ClassStore.origin must be int32 [classes, max_images, 4]")

    def _rows(self, field: str, rows: torch.Tensor) -> torch.Tensor | None:
        value = getattr(self, field)
        return value[rows] if value is not None else None

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
        return ClassStore(self.images[rows], list(names), self.counts[rows], groups,
                          *(self._rows(f, rows) for f in ("drawers", "digests", "origin")),
                          partial=self.partial)

    @staticmethod
    def concat(stores: list[ClassStore]) -> ClassStore:
        """All classes of several stores (same image shape) in one store.

        Groups, drawers, digests and origins are kept only when every store has them.
        """
        width = max(s.images.shape[1] for s in stores)

        def padded(field: str, value: int = 0) -> torch.Tensor | None:
            parts = [getattr(s, field) for s in stores]
            if any(p is None for p in parts):
                return None
            pad = lambda p: torch.nn.functional.pad(  # the images axis is dim 1
                p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]), value=value)
            return torch.cat([pad(p) for p in parts])

        groups = None
        if all(s.groups is not None for s in stores):
            groups = [g for s in stores for g in s.groups]
        return ClassStore(
            padded("images"),
            [n for s in stores for n in s.names],
            torch.cat([s.counts for s in stores]),
            groups,
            padded("drawers", -1),
            padded("digests"),
            padded("origin"),
            partial=any(s.partial for s in stores),
        )

    def rotated(self, degrees: list[int], key: str = "dataset.rotations") -> ClassStore:
        """Each rotation by a multiple of 90 degrees becomes a class of its own (Omniglot x4).

        Raises:
            FewshotError: ``degrees`` (the option ``key``) names a quarter turn twice or is not
                made of multiples of 90 from 0 to 270 (:func:`quarter_turns`)."""
        if not degrees:
            return self
        degrees = quarter_turns(degrees, key)
        if degrees == [0]:
            return self
        parts = [torch.rot90(self.images, (d // 90) % 4, dims=(-2, -1)) for d in degrees]
        names = [f"{n}/{ROTATED.format(d)}" for d in degrees for n in self.names]
        # a rotated character keeps its alphabet, its drawers and its source files (digests)
        groups = self.groups * len(degrees) if self.groups is not None else None
        repeat = lambda t: t.repeat(len(degrees), *(1,) * (t.dim() - 1)) if t is not None \
            else None
        return ClassStore(torch.cat(parts), names, self.counts.repeat(len(degrees)), groups,
                          repeat(self.drawers), repeat(self.digests), repeat(self.origin),
                          partial=self.partial)

    def save(self, path: Path) -> None:
        """Write the store atomically (a reader never sees half a file), with a checksum of
        its contents that :meth:`load` verifies."""
        payload = {"version": CACHE_VERSION, "images": self.images, "names": self.names,
                   "counts": self.counts}
        for field in ("drawers", "digests", "origin"):
            if getattr(self, field) is not None:
                payload[field] = getattr(self, field)
        if self.groups is not None:
            payload["groups"] = list(self.groups)
        payload["checksum"] = checksum(payload)
        atomic_torch_save(payload, path)

    @staticmethod
    def load(path: Path, mmap: bool = True) -> ClassStore:
        """Read a store written by :meth:`save`; the image tensor is memory-mapped.

        Raises ValueError for a cache of another version and DamagedCache when the contents do
        not match the checksum written with them (a disk error, an edited file).
        """
        payload = torch.load(path, mmap=mmap, weights_only=True)
        if payload.get("version") != CACHE_VERSION:
            raise ValueError(f"{path} was written by another cache version")
        if payload.get("checksum") != checksum(payload):
            raise DamagedCache(f"{path} does not match its checksum")
        groups = payload.get("groups")
        return ClassStore(payload["images"], list(payload["names"]), payload["counts"],
                          list(groups) if groups is not None else None, payload.get("drawers"),
                          payload.get("digests"), payload.get("origin"))


class DamagedCache(ValueError):
    """A cache file whose contents changed after it was written."""


CHECKED = ("images", "counts", "drawers", "digests", "origin")


def checksum(payload: dict) -> str:
    """sha1 of a cache's tensors (read in place from the memory map) and its names; sha1
    because it runs at twice blake2b's speed here (scripts/bench_cache_check.py)."""
    h = hashlib.sha1()
    h.update(json.dumps([payload["names"], payload.get("groups")]).encode())
    for field in CHECKED:
        value = payload.get(field)
        if value is not None:
            h.update(f"{field}:{tuple(value.shape)}:{value.dtype}".encode())
            h.update(memoryview(value.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fewshot`` (``~/.cache/fewshot`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewshot"


def cache_file(data_root: Path, key: dict) -> Path:
    """Where the decoded cache for ``key`` lives: in ``$FEWSHOT_CACHE`` when set, else next to
    the data (``<root>/.fewshot-cache``), or in the user cache when the data is read-only.

    The key (reader name, source files, image size...) is hashed into the file name, so a
    change of any of them builds a new cache instead of reading a stale one.
    """
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key.get('reader', 'store')}-{digest}.pt"
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV])) / name
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
    """Load the store cached at ``path``, building and saving it first when absent, stale or
    damaged (its contents no longer match the checksum written with them: one log line)."""
    if path.exists():
        try:
            return ClassStore.load(path)
        except DamagedCache:
            log.warning("the decoded cache %s is damaged (its contents do not match the "
                        "checksum written with them); decoding the images again", path)
            path.unlink(missing_ok=True)
        except Exception:  # a cache from another version or a torn copy: rebuild it
            path.unlink(missing_ok=True)
    store = build()
    if store.partial:  # some files could not be decoded (fewshot data): never cache holes
        return store
    try:
        store.save(path)
    except (OSError, RuntimeError) as err:  # a full or read-only disk: run without the cache
        log.warning("%s; continuing without it", write_failure(path, err, "no cache was kept"))
        return store
    return ClassStore.load(path)
