"""Shared image machinery of the readers: list image files, fingerprint them for the cache key,
decode them in parallel at one size into a ClassStore, and name the file that cannot be read.

A reader (Omniglot, miniImageNet, a user's folder) keeps only its layout and split rules: it
lists ``class name -> image files`` and calls :func:`decode_files`; every image is decoded once
as an image viewer shows it (:func:`decode_image`: upright by its EXIF orientation,
transparency over a white page, deep grey scaled to 8 bits), squashed to ``size`` x ``size``
with a Lanczos filter (:func:`squash`), and packed into ``uint8
[classes, max_images, C, size, size]`` (short classes padded, ``counts`` marking the padding),
with a content digest and the origin (mode, size, flags) of every file for the data checks.
``fewshot predict`` decodes a user's images through the same function, and images that come
as pixels rather than files (a miniImageNet pickle, a cross-domain store at another size) are
resized by the same :func:`squash` (:func:`resize_pixels`): one filter, whatever the layout.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from itertools import repeat
from pathlib import Path
from typing import Any

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from fewshot_cli.data.store import ClassStore
from fewshot_cli.errors import FewshotError

# Part of the readers' cache keys: another filter or decode means another cache. "lanczos2":
# EXIF orientation applied, JPEGs decoded at full scale (no DCT draft) before the filter.
RESAMPLE = "lanczos2"
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


# Source modes of decoded images, by code (stored in caches: append only).
PIL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
             "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
OTHER_MODE = len(PIL_MODES)
COMPOSITED, RESCALED, FAILED = 1, 2, 4  # flags of an image's origin
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def mode_name(code: int) -> str:
    """The PIL mode of an origin's mode code (``?`` for a mode fewshot does not list)."""
    return PIL_MODES[code] if 0 <= code < len(PIL_MODES) else "?"


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as 8-bit ``L`` (``LA`` when a grey value is marked
    transparent), as a viewer shows it: integers span 0..65535 (16-bit PNG and TIFF; ``I`` is
    how older Pillow opened them), floats 0..1 when no value exceeds 1, else 0..255."""
    import numpy as np

    values = np.asarray(img)
    if img.mode == "F":
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and float(finite.max()) <= 1.0 else 1.0
    else:
        scale = 1 / 257  # 65535 -> 255
    grey = Image.fromarray(np.clip(np.rint(np.nan_to_num(values * scale)), 0, 255)
                           .astype(np.uint8))
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey


def as_seen(img: Image.Image, mode: str) -> tuple[Image.Image, int]:
    """``img`` in ``mode`` (``L`` or ``RGB``) as an image viewer shows it, and its flags.

    Transparency (an alpha band, a palette's or PNG's transparent colour) is composited over a
    white page (COMPOSITED when any pixel is not opaque); 16-bit, 32-bit and float grey are
    scaled to 8 bits (RESCALED); every other mode (1, P, CMYK, YCbCr, LAB, HSV...) is converted
    by PIL. Raises what PIL raises for a mode it cannot convert.
    """
    flags = 0
    if img.mode in DEEP_MODES:
        img, flags = _eight_bit(img), RESCALED
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # applies a palette's tRNS and L/RGB transparent colours
        if rgba.getchannel("A").getextrema()[0] < 255:
            flags |= COMPOSITED
            page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(page, rgba)
        img = rgba.convert("RGB")
    if img.mode != mode:
        try:
            img = img.convert(mode)
        except ValueError:  # LAB converts to RGB only
            img = img.convert("RGB").convert(mode)
    return img, flags


def _digest(img: Image.Image) -> int:
    """A 64-bit content hash of an image's pixels and size (signed, as a torch.long holds it)."""
    h = hashlib.blake2b(f"{img.mode}:{img.size}".encode(), digest_size=8)
    h.update(img.tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says a viewer shows it (a phone photo taken
    upright is stored sideways with orientation 6), by PIL's ``ImageOps.exif_transpose``; the
    same image when it has no such tag."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (1, None):
        return img
    return ImageOps.exif_transpose(img)


def squash(img: Image.Image, size: int) -> Image.Image:
    """``img`` resized to ``size`` x ``size`` px with PIL's Lanczos filter, the one resize of
    every reader, of ``fewshot predict`` and of pixels read from arrays (:func:`resize_pixels`)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.LANCZOS)


def decode_image(img: Image.Image, size: int, mode: str) -> tuple[bytes, int, int]:
    """An opened image file as the readers store it: ``mode`` pixels at ``size`` x ``size``,
    channel-major (``[C, H, W]`` bytes), the content digest of the source as seen (upright, in
    ``mode``, before resizing, so equal images in two files and at any size are found), and
    its origin flags (:func:`as_seen`). JPEGs are decoded at full scale (no DCT draft), so a
    file and its decoded pixels in an array give the same tensor at every size."""
    img, flags = as_seen(upright(img), mode)
    digest = _digest(img)
    pixels = b"".join(band.tobytes() for band in squash(img, size).split())
    return pixels, digest, flags


def resize_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) resized to ``[N, C, size, size]`` by :func:`squash`:
    a pickle's or a store's pixels become exactly what the same pixels in a PNG decode to."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    mode = "L" if images.shape[1] == 1 else "RGB"
    for i, image in enumerate(images):  # once per image, when a cache is built
        array = image.permute(1, 2, 0).contiguous().numpy()
        img = Image.fromarray(array[..., 0] if mode == "L" else array, mode)
        resized = torch.frombuffer(bytearray(squash(img, size).tobytes()), dtype=torch.uint8)
        out[i] = resized.view(size, size, -1).permute(2, 0, 1)
    return out


def _decode(paths: list[str], size: int, mode: str, archive: str | None, what: str,
            fix: str, collect: bool = False) -> tuple[bytes, list[tuple[int, ...]], list[str]]:
    """``mode`` pixels of each image at ``size`` x ``size``, channel-major, concatenated; each
    image's origin ``(digest, mode code, width, height, flags)``; and, when ``collect``, the
    sentences of files that could not be decoded (left blank) instead of raising at the first.

    A pool worker's job: ``paths`` are files, or members of the zip ``archive``; each is
    decoded by :func:`decode_image`.
    """
    out, origins, failures = bytearray(), [], []
    opened = zipfile.ZipFile(archive) if archive else None
    blank = bytes(size * size * MODES[mode])
    try:
        for path in paths:
            try:
                source = io.BytesIO(opened.read(path)) if opened else path
                with Image.open(source) as img:
                    code = PIL_MODES.index(img.mode) if img.mode in PIL_MODES else OTHER_MODE
                    width, height = img.size
                    pixels, digest, flags = decode_image(img, size, mode)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
                where = f"{archive}:{path}" if archive else path
                # PIL's own words name an in-memory buffer (<_io.BytesIO ...>), not the file
                why = "not an image" if isinstance(e, UnidentifiedImageError) else e
                sentence = f"cannot decode the {what} {where} ({why}); {fix}"
                if not collect:
                    raise FewshotError(sentence) from None
                failures.append(sentence)
                pixels, digest, code, width, height, flags = blank, 0, OTHER_MODE, 0, 0, FAILED
            out += pixels
            origins.append((digest, code, width, height, flags))
    finally:
        if opened:
            opened.close()
    return bytes(out), origins, failures


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def empty_store(counts: torch.Tensor, channels: int, size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed ``[classes, max_count, C, S, S]`` tensor and each image's row in its flat view."""
    width = int(counts.max()) if len(counts) else 0
    images = torch.zeros(len(counts), width, channels, size, size, dtype=torch.uint8)
    slot = torch.arange(width).expand(len(counts), width) < counts.unsqueeze(1)
    return images, slot.flatten().nonzero().squeeze(1)


def _fill(flat: torch.Tensor, rows: torch.Tensor,
          parts: Iterable[tuple[bytes, list[tuple[int, ...]], list[str]]],
          progress: Callable[[int], Any] = lambda n: None
          ) -> tuple[list[tuple[int, ...]], list[str]]:
    """Copy decoded chunks, in order, into their rows as they arrive (no second full copy),
    telling ``progress`` how many images each brought; returns every image's origin and the
    sentences of the files that failed."""
    start, origins, failures = 0, [], []
    for part, origin, failed in parts:
        block = torch.frombuffer(bytearray(part), dtype=torch.uint8).view(-1, flat.shape[1])
        flat[rows[start : start + len(block)]] = block
        start += len(block)
        progress(len(block))
        origins += origin
        failures += failed
    return origins, failures


_collected: ContextVar[list[str] | None] = ContextVar("collected", default=None)


@contextmanager
def collecting_failures() -> Iterator[list[str]]:
    """Inside this block, :func:`decode_files` does not raise at a file it cannot decode: it
    adds the sentence to the yielded list, leaves the image blank and marks the store partial
    (never cached). ``fewshot data`` lists every bad file this way."""
    failures: list[str] = []
    token = _collected.set(failures)
    try:
        yield failures
    finally:
        _collected.reset(token)


def origin_tensors(counts: torch.Tensor, origins: Sequence[tuple[int, ...]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(digest, mode code, width, height, flags)`` tuples, in class order, as the
    store's ``digests`` (long ``[classes, max_count]``) and ``origin`` (int32 ``[classes,
    max_count, 4]``: mode code, width, height, flags); zeros in the padding."""
    width = int(counts.max()) if len(counts) else 0
    digests = torch.zeros(len(counts) * width, dtype=torch.long)
    origin = torch.zeros(len(counts) * width, 4, dtype=torch.int32)
    _, rows = empty_store(counts, 0, 0)
    if origins:
        table = torch.tensor(origins, dtype=torch.long)
        digests[rows], origin[rows] = table[:, 0], table[:, 1:].to(torch.int32)
    return digests.view(len(counts), width), origin.view(len(counts), width, 4)


def array_digest(pixels: torch.Tensor) -> int:
    """The digest :func:`_digest` gives the same image decoded by PIL, of uint8 pixels
    ``[H, W, C]`` (C = 1 or 3) already in memory: equal pixels, equal digests, whatever the
    reader (a miniImageNet pickle, generated glyphs) or the file format."""
    height, width, channels = pixels.shape
    h = hashlib.blake2b(f"{'L' if channels == 1 else 'RGB'}:{(width, height)}".encode(),
                        digest_size=8)
    h.update(pixels.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def pixel_digests(images: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Content digests (long ``[classes, max_count]``, 0 in the padding) of images already
    decoded, ``uint8 [classes, max_count, C, H, W]`` (generated, or read from an array)."""
    digests = torch.zeros(images.shape[:2], dtype=torch.long)
    for c, n in enumerate(counts.tolist()):  # once per image, when the cache is built
        for i in range(n):
            digests[c, i] = array_digest(images[c, i].permute(1, 2, 0))
    return digests


def decode_files(files: Mapping[str, Sequence[Path | str]], size: int, mode: str = "RGB", *,
                 archive: Path | None = None, what: str = "image",
                 fix: str = "delete or replace it") -> ClassStore:
    """Decode every listed image at ``size`` px into a ClassStore (in parallel when many).

    Images are seen as a viewer shows them (:func:`decode_image`: upright by their EXIF
    orientation, transparency over white, deep grey scaled to 8 bits) and squashed to
    ``size`` x ``size`` by :func:`squash` (Lanczos). The store keeps each image's content
    digest and origin (mode, size, flags) for the data checks.
    ``mode``: ``L`` (1 channel), ``RGB`` (3), or ``auto``: RGB, kept as 1 channel when every
    image turns out grey. ``archive``: the files are members of this zip. A file that cannot
    be decoded raises a FewshotError "cannot decode the {what} {file} (...); {fix}" (unless
    inside :func:`collecting_failures`).
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
        max(len(paths), 1)
    chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
    archive_path = str(archive) if archive else None
    collected = _collected.get()
    job = (repeat(size), repeat(decode_mode), repeat(archive_path), repeat(what), repeat(fix),
           repeat(collected is not None))
    # on a terminal only (stderr), like the training bar; gone once the images are decoded
    with tqdm(total=len(paths), desc=f"decode {what}s", unit="image", leave=False,
              disable=None, dynamic_ncols=True) as bar:
        if len(chunks) > 1:
            # fork: workers need only PIL and start instantly (DataLoader's default on Linux)
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = ProcessPoolExecutor(workers, mp_context=ctx)
            try:
                origins, failures = _fill(flat, rows, pool.map(_decode, chunks, *job),
                                          bar.update)
            finally:  # on a bad file, do not wait for the remaining chunks
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            origins, failures = _fill(flat, rows, map(_decode, chunks, *job), bar.update)
    if mode == "auto" and bool((images[:, :, 0] == images[:, :, 1]).all()) and \
            bool((images[:, :, 1] == images[:, :, 2]).all()):
        images = images[:, :, :1].contiguous()  # every image grey: one channel is enough
    digests, origin = origin_tensors(counts, origins)
    if failures and collected is not None:
        collected += failures
    return ClassStore(images, names, counts, digests=digests, origin=origin,
                      partial=bool(failures))
