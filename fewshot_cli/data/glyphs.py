"""Glyphs: procedurally drawn characters, so that training works with no files and no network.

A class is a random stroke program: 2-4 cubic Bezier strokes (straight or curved), later strokes
often starting on an earlier one, as the pen strokes of a character do. Each drawing of a class
re-draws its program with pen noise (control-point jitter, stroke width) and affine jitter
(rotation, scale, shear, translation). Black strokes on white, like Omniglot. Train, val and test
programs come from different seeds, so the splits share no class. Like the readers of image files,
each drawing carries a content digest, so the split checks (no identical image in two splits)
and the run's split record cover glyphs too.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from fewshot_cli.data.base import SPLITS, FewShotDataset
from fewshot_cli.data.images import PIL_MODES, pixel_digests
from fewshot_cli.data.store import (
    ClassStore,
    cache_file,
    cached_store,
    quarter_turns,
    user_cache_dir,
)
from fewshot_cli.errors import FewshotError

VERSION = 1  # part of the cache key: bump it whenever the drawings change
MAX_STROKES = 4
# Per-drawing noise, in units of the half image (coordinates run from -1 to 1) and radians:
# Gaussian sd of each control point and of each whole stroke, then uniform +- ranges.
NOISE = {"point": 0.045, "stroke": 0.035, "rotate": 0.2, "scale": 0.12, "stretch": 0.06,
         "shear": 0.2, "shift": 0.15, "width": 0.2}
CHUNK = 2048  # drawings rendered at once at 28 px: bounds the [points, disc] tensors


def _bezier(control: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points of cubic Beziers: control ``[..., 4, 2]`` at t ``[..., T]`` -> ``[..., T, 2]``."""
    t = t.unsqueeze(-1)
    s = 1 - t
    basis = torch.cat([s**3, 3 * s**2 * t, 3 * s * t**2, t**3], dim=-1)  # [..., T, 4]
    return basis @ control


def sample_programs(classes: int, g: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random characters: stroke control points ``[classes, 4, 4, 2]``, which of the 4 strokes
    are drawn ``[classes, 4]``, and pen half-width ``[classes]`` (image half-size units)."""
    rand = lambda *shape: torch.rand(*shape, generator=g)
    rows = torch.arange(classes)
    mask = torch.arange(MAX_STROKES) < torch.randint(2, MAX_STROKES + 1, (classes, 1), generator=g)
    control = torch.empty(classes, MAX_STROKES, 4, 2)
    for i in range(MAX_STROKES):  # a stroke may start on an earlier one: a loop over 4 strokes
        p0 = rand(classes, 2) * 1.2 - 0.6
        if i:
            # Half of the later strokes start on an earlier stroke, like joined pen strokes.
            earlier = control[rows, torch.randint(0, i, (classes,), generator=g)]
            on = _bezier(earlier, rand(classes, 1)).squeeze(1)
            p0 = torch.where((rand(classes) < 0.5).unsqueeze(-1), on, p0)
        angle = rand(classes) * 2 * math.pi
        chord = torch.stack([angle.cos(), angle.sin()], -1) * (0.6 + 0.6 * rand(classes, 1))
        p3 = (p0 + chord).clamp(-0.8, 0.8)
        d = p3 - p0
        normal = torch.stack([-d[:, 1], d[:, 0]], -1)
        # Straight strokes keep the inner points on the chord; curved ones push them sideways.
        bend = (rand(classes, 2) * 2 - 1) * 0.9 * (rand(classes, 1) < 0.6)
        control[:, i] = torch.stack([p0, p0 + d / 3 + normal * bend[:, :1],
                                     p0 + 2 * d / 3 + normal * bend[:, 1:], p3], dim=1)
    # Centre each character and shrink the large ones to fit, as a writer fills the box.
    points = _bezier(control, torch.linspace(0, 1, 9))  # [classes, strokes, 9, 2]
    far = torch.where(mask[:, :, None, None], points, float("nan"))
    low = far.nan_to_num(9.0).amin(dim=(1, 2))
    high = far.nan_to_num(-9.0).amax(dim=(1, 2))
    fit = (1.5 / (high - low).amax(-1)).clamp(max=1.0)
    control = (control - ((low + high) / 2)[:, None, None]) * fit[:, None, None, None]
    width = 0.045 + 0.02 * rand(classes)
    return control, mask, width


def _jitter(control: torch.Tensor, width: torch.Tensor, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One drawing per row: pen noise on the control points and width, then an affine warp."""
    m, n = control.shape[0], NOISE
    randn = lambda *shape: torch.randn(*shape, generator=g)
    rand = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1
    control = (control + n["point"] * randn(*control.shape)
               + n["stroke"] * randn(m, MAX_STROKES, 1, 2))
    angle = n["rotate"] * rand(m)
    scale = (1 + n["scale"] * rand(m, 1)) * (1 + n["stretch"] * rand(m, 2))
    shear = n["shear"] * rand(m)
    rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], -1).view(m, 2, 2)
    shear_m = torch.stack([torch.ones(m), shear, torch.zeros(m), torch.ones(m)], -1).view(m, 2, 2)
    affine = rot @ shear_m * scale.unsqueeze(1)  # x' = A x, with A's columns scaled
    shift = n["shift"] * rand(m, 1, 1, 2)
    control = torch.einsum("mij,mskj->mski", affine, control) + shift
    return control, width * (1 + n["width"] * rand(m))


def render(control: torch.Tensor, mask: torch.Tensor, width: torch.Tensor, size: int
           ) -> torch.Tensor:
    """Drawings as uint8 ``[M, 1, S, S]`` (0 = ink) from stroke control points ``[M, 4, 4, 2]``.

    Each densely sampled stroke point splats its squared distance into a small disc of pixels
    around it; a pixel's ink follows its nearest stroke point, with a soft one-pixel edge.
    """
    m, pixel = control.shape[0], 2 / size
    # Ink reaches w + 0.5 px from a point; its pixel is at most 0.71 px from the rounded point.
    radius = float(width.max()) / pixel + 1.21
    reach = math.ceil(radius)
    # Points are clamped into a margin wide enough that their discs never reach the image, so
    # no bounds test is needed; the margin is cropped away at the end.
    pad = 2 * reach + 1
    canvas = size + 2 * pad
    # Sample spacing s bulges the edge by about s^2 / 8w; ~8 sqrt(S) points keep it < 0.1 px.
    samples = math.ceil(8 * math.sqrt(size))
    points = _bezier(control[mask], torch.linspace(0, 1, samples))  # [strokes, T, 2] in [-1, 1]
    owner = torch.arange(m).repeat_interleave(mask.sum(1))  # the drawing of each stroke
    uv = ((points + 1) / pixel - 0.5).clamp(-reach - 1, size + reach) + pad
    base = uv.round()
    frac = (uv - base).reshape(-1, 2)
    oy, ox = torch.meshgrid(torch.arange(-reach, reach + 1), torch.arange(-reach, reach + 1),
                            indexing="ij")
    disc = ox**2 + oy**2 <= radius**2
    offsets = torch.stack([ox[disc], oy[disc]], -1).float()  # [W, 2]
    # |o - f|^2 = |o|^2 + |f|^2 - 2 f.o for every (point, offset) pair in one addmm
    d2 = torch.addmm((offsets**2).sum(-1) + (frac**2).sum(-1, keepdim=True), frac, offsets.T,
                     alpha=-2)
    base = base.long()
    flat = (owner[:, None] * canvas**2 + base[..., 1] * canvas + base[..., 0]).reshape(-1, 1)
    flat = flat + (ox[disc] + oy[disc] * canvas)
    nearest = torch.full((m * canvas * canvas,), 1e6)
    nearest.scatter_reduce_(0, flat.reshape(-1), d2.reshape(-1), "amin")
    nearest = nearest.view(m, canvas, canvas)[:, pad : pad + size, pad : pad + size]
    # squared distances are in pixels: ink is full inside the pen, fading over one pixel
    ink = (width[:, None, None] / pixel - nearest.clamp_min(0).sqrt() + 0.5).clamp(0, 1)
    return ((1 - ink) * 255).round().to(torch.uint8).view(m, 1, size, size)


def draw_glyphs(classes: int, images: int, size: int, seed: int) -> torch.Tensor:
    """``images`` drawings of ``classes`` random programs: uint8 ``[classes, images, 1, S, S]``."""
    g = torch.Generator().manual_seed(seed)
    control, mask, width = sample_programs(classes, g)
    control = control.repeat_interleave(images, 0)
    mask, width = mask.repeat_interleave(images, 0), width.repeat_interleave(images, 0)
    control, width = _jitter(control, width, g)
    # points per stroke grow as sqrt(S) and the disc of pixels as S^2: shrink the chunk to match
    chunk = max(16, int(CHUNK * (28 / size) ** 2.5))
    out = torch.cat([render(control[i : i + chunk], mask[i : i + chunk], width[i : i + chunk], size)
                     for i in range(0, control.shape[0], chunk)])
    return out.view(classes, images, 1, size, size)


def split_seed(seed: int, split: str) -> int:
    """A seed per (seed, split): the three splits never share a program."""
    return int(hashlib.sha256(f"glyphs/{seed}/{split}".encode()).hexdigest()[:15], 16)


class Glyphs(FewShotDataset):
    """Generated characters: ``classes[split]`` programs, ``images_per_class`` drawings each."""

    rotatable = True  # a rotated character is another character (eval.rotations)

    def __init__(self, classes: dict, images_per_class: int = 20, image_size: int = 28,
                 seed: int = 0, rotations: list[int] | tuple[int, ...] = (0,),
                 allow_duplicates: bool = False) -> None:
        for split in SPLITS:
            n = classes.get(split) if hasattr(classes, "get") else None
            if not isinstance(n, int) or n < 1:
                raise FewshotError(f"dataset.classes.{split}={n} must be a positive number of "
                                   f"classes; set it, e.g. dataset.classes.{split}=100")
        for key, value in (("images_per_class", images_per_class), ("image_size", image_size)):
            if not isinstance(value, int) or value < 2:
                raise FewshotError(f"dataset.{key}={value} must be an integer of at least 2")
        self.classes = {s: int(classes[s]) for s in SPLITS}
        self.images_per_class, self.image_size = images_per_class, image_size
        self.seed, self.rotations = int(seed), quarter_turns(rotations)
        self.allow_duplicates = bool(allow_duplicates)

    def load(self, split: str) -> ClassStore:
        """The drawn classes of ``split``; train includes the rotated copies."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        n, k, size = self.classes[split], self.images_per_class, self.image_size

        def build() -> ClassStore:
            images = draw_glyphs(n, k, size, split_seed(self.seed, split))
            counts = torch.full((n,), k, dtype=torch.long)
            origin = torch.tensor([PIL_MODES.index("L"), size, size, 0],
                                  dtype=torch.int32).expand(n, k, 4).clone()
            return ClassStore(images, [f"glyphs/{split}/{i:04d}" for i in range(n)], counts,
                              digests=pixel_digests(images, counts), origin=origin)

        # drawing grows with the image's area (Koch's 105 px is slow): draw once, then load
        key = {"reader": "glyphs", "version": VERSION, "split": split, "classes": n,
               "images": k, "image_size": size, "seed": self.seed}
        store = cached_store(cache_file(user_cache_dir(), key), build)
        return store.rotated(self.rotations) if split == "train" else store

    def details(self) -> dict[str, Any]:
        return {"classes": self.classes, "images_per_class": self.images_per_class,
                "image_size": self.image_size, "seed": self.seed, "rotations": self.rotations}
