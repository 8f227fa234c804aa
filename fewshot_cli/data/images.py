"""Shared image machinery of the readers: list image files, fingerprint them for the cache key,
decode them in parallel at one size into a ClassStore, and name the file that cannot be read.

A reader (Omniglot, miniImageNet, a user's folder) keeps only its layout and split rules: it
lists ``class name -> image files`` and calls :func:`decode_files`; every image is decoded once,
squashed to ``size`` x ``size`` with a Lanczos filter, and packed into ``uint8 [classes,
max_images, C, size, size]`` (short classes padded, ``counts`` marking the padding).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from itertools import repeat
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from fewshot_cli.data.store import ClassStore
from fewshot_cli.errors import FewshotError

RESAMPLE = "lanczos"  # part of the readers' cache keys: another filter means another cache
PARALLEL_FROM = 1000  # below this many images a process pool costs more than it saves
MODES = {"L": 1, "RGB": 3}


@cache
def image_extensions() -> frozenset[str]:
    """The lower-case file extensions of every format PIL can open (``.png``, ``.jpg``, ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def list_images(folder: Path, extensions: Iterable[str] | None = None) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; hidden files are skipped."""
    wanted = tuple(extensions or image_extensions())
    return [Path(folder) / name for name in sorted(
        e.name for e in os.scandir(folder)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(wanted))]


def list_class_folders(folder: Path, extensions: Iterable[str] | None = None
                       ) -> dict[str, list[Path]]:
    """Class (sub-folder name) -> its image files, both sorted by name; empty folders skipped."""
    files: dict[str, list[Path]] = {}
    for cls in sorted(e.name for e in os.scandir(folder)
                      if e.is_dir() and not e.name.startswith(".")):
        images = list_images(Path(folder) / cls, extensions)
        if images:
            files[cls] = images
    return files


def fingerprint(files: Mapping[str, Sequence[Path]], missing: str,
                relative_to: Path | None = None) -> str:
    """Changes when any listed image is added, removed, renamed, resized or touched.

    ``missing`` is the sentence raised for a listed file that is gone, with ``{path}`` and
    ``{cls}`` filled in; paths enter the hash relative to ``relative_to`` when given.
    """
    h = hashlib.sha1()
    for cls, paths in files.items():
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                raise FewshotError(missing.format(path=p, cls=cls)) from None
            name = Path(p).relative_to(relative_to).as_posix() if relative_to else str(p)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(paths: list[str], size: int, mode: str, archive: str | None, what: str,
            fix: str) -> bytes:
    """``mode`` pixels of each image at ``size`` x ``size``, channel-major, concatenated.

    A pool worker's job: ``paths`` are files, or members of the zip ``archive``.
    """
    out = bytearray()
    opened = zipfile.ZipFile(archive) if archive else None
    try:
        for path in paths:
            try:
                source = io.BytesIO(opened.read(path)) if opened else path
                with Image.open(source) as img:
                    img.draft(mode, (size, size))  # JPEG: decode at a reduced scale >= size
                    img = img.convert(mode)
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.Resampling.LANCZOS)
                    for band in img.split():  # [C, H, W] order, as the store keeps it
                        out += band.tobytes()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
                where = f"{archive}:{path}" if archive else path
                # PIL's own words name an in-memory buffer (<_io.BytesIO ...>), not the file
                why = "not an image" if isinstance(e, UnidentifiedImageError) else e
                raise FewshotError(f"cannot decode the {what} {where} ({why}); {fix}") from None
    finally:
        if opened:
            opened.close()
    return bytes(out)


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def empty_store(counts: torch.Tensor, channels: int, size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed ``[classes, max_count, C, S, S]`` tensor and each image's row in its flat view."""
    width = int(counts.max())
    images = torch.zeros(len(counts), width, channels, size, size, dtype=torch.uint8)
    slot = torch.arange(width).expand(len(counts), width) < counts.unsqueeze(1)
    return images, slot.flatten().nonzero().squeeze(1)


def _fill(flat: torch.Tensor, rows: torch.Tensor, parts: Iterable[bytes]) -> None:
    """Copy decoded chunks, in order, into their rows as they arrive (no second full copy)."""
    start = 0
    for part in parts:
        block = torch.frombuffer(bytearray(part), dtype=torch.uint8).view(-1, flat.shape[1])
        flat[rows[start : start + len(block)]] = block
        start += len(block)


def decode_files(files: Mapping[str, Sequence[Path | str]], size: int, mode: str = "RGB", *,
                 archive: Path | None = None, what: str = "image",
                 fix: str = "delete or replace it") -> ClassStore:
    """Decode every listed image at ``size`` px into a ClassStore (in parallel when many).

    ``mode``: ``L`` (1 channel), ``RGB`` (3), or ``auto``: RGB, kept as 1 channel when every
    image turns out grey. ``archive``: the files are members of this zip. A file that cannot
    be decoded raises a FewshotError "cannot decode the {what} {file} (...); {fix}".
    """
    decode_mode = "RGB" if mode == "auto" else mode
    if decode_mode not in MODES:
        raise ValueError(f"mode must be L, RGB or auto, got {mode!r}")
    names = list(files)
    paths = [str(p) for n in names for p in files[n]]
    counts = torch.tensor([len(files[n]) for n in names], dtype=torch.long)
    channels = MODES[decode_mode]
    images, rows = empty_store(counts, channels, size)
    flat = images.view(-1, channels * size * size)
    workers = min(_workers(), 8)
    step = -(-len(paths) // (workers * 8)) if workers > 1 and len(paths) >= PARALLEL_FROM else \
        len(paths)
    chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
    archive_path = str(archive) if archive else None
    job = (repeat(size), repeat(decode_mode), repeat(archive_path), repeat(what), repeat(fix))
    if len(chunks) > 1:
        # fork: workers need only PIL and start instantly (DataLoader's default on Linux too)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ProcessPoolExecutor(workers, mp_context=ctx)
        try:
            _fill(flat, rows, pool.map(_decode, chunks, *job))
        finally:  # on a bad file, do not wait for the remaining chunks
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        _fill(flat, rows, (_decode(c, size, decode_mode, archive_path, what, fix)
                           for c in chunks))
    if mode == "auto" and bool((images[:, :, 0] == images[:, :, 1]).all()) and \
            bool((images[:, :, 1] == images[:, :, 2]).all()):
        images = images[:, :, :1].contiguous()  # every image grey: one channel is enough
    return ClassStore(images, names, counts)
