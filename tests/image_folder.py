"""A user's image folder, generated: classes of random coloured shapes, mixed sizes, PNG and
JPEG, optionally grouped in parent folders, with one corrupt file and one class too small."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def draw_shape(rng: random.Random, shape: str, colour: tuple[int, int, int]) -> Image.Image:
    """One image of ``shape`` in ``colour`` on a random light background, at a random size."""
    w, h = rng.randint(24, 72), rng.randint(24, 72)
    img = Image.new("RGB", (w, h), tuple(rng.randint(190, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.uniform(0.05, 0.25) * w, rng.uniform(0.05, 0.25) * h
    x1, y1 = rng.uniform(0.75, 0.95) * w, rng.uniform(0.75, 0.95) * h
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    if shape == "ellipse":
        d.ellipse((x0, y0, x1, y1), fill=jitter)
    elif shape == "rectangle":
        d.rectangle((x0, y0, x1, y1), fill=jitter)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=jitter)
    else:
        t = (x1 - x0) / 5
        d.rectangle(((x0 + x1) / 2 - t, y0, (x0 + x1) / 2 + t, y1), fill=jitter)
        d.rectangle((x0, (y0 + y1) / 2 - t, x1, (y0 + y1) / 2 + t), fill=jitter)
    return img


def make_image_folder(root: Path, layout: dict[str, int], seed: int = 0,
                      corrupt: str | None = None, grey: bool = False) -> Path:
    """``root/<class path>/<n>.png|jpg`` for each ``class path -> image count`` of ``layout``.

    A class is one shape in one colour; images alternate PNG and JPEG. ``corrupt`` names a class
    that gets one more file, ``broken.png``, holding half a PNG.
    """
    rng = random.Random(seed)
    for c, (name, count) in enumerate(layout.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = tuple(rng.randint(0, 160) for _ in range(3))
        for i in range(count):
            img = draw_shape(rng, SHAPES[c % len(SHAPES)], colour)
            img = img.convert("L") if grey else img
            suffix = ".png" if i % 2 else ".jpg"
            img.save(folder / f"{i:03d}{suffix}")
    if corrupt is not None:
        good = next((root / corrupt).glob("*.png")).read_bytes()
        (root / corrupt / "broken.png").write_bytes(good[: len(good) // 2])
    return root
