"""Decoding as a viewer shows an image: every mode PIL opens, transparency over a white page,
deep grey scaled to 8 bits, against references built apart from the decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_cli.data import images
from fewshot_cli.data.images import COMPOSITED, PIL_MODES, RESCALED, decode_files

SIZE = 12


def source() -> tuple[np.ndarray, np.ndarray]:
    """A test card: colour ``uint8 [S, S, 3]`` and alpha ``uint8 [S, S]``: dark strokes fully
    opaque, a coloured patch half transparent, the page fully transparent (its colour black, as
    drawing programs leave it)."""
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    rgb[2:10, 5:7] = (20, 20, 20)
    alpha[2:10, 5:7] = 255
    rgb[8:11, 1:4] = (200, 40, 90)
    alpha[8:11, 1:4] = 128
    return rgb, alpha


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The composite by its definition: c * a + 255 * (1 - a), per channel."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def png(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def files() -> dict[str, tuple[bytes, Image.Image]]:
    """Each case: the file's bytes and the reference image, composited over a white RGBA page
    with PIL's alpha_composite (or, for opaque modes, the source as it is)."""
    rgb, alpha = source()
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    seen = Image.alpha_composite(white, rgba).convert("RGB")
    grey = Image.fromarray(rgb).convert("L")
    la = Image.merge("LA", (grey, Image.fromarray(alpha)))
    seen_la = Image.alpha_composite(white, la.convert("RGBA")).convert("RGB")
    palette = Image.fromarray(rgb).quantize(8)
    index = palette.getpixel((0, 0))  # the page's palette entry becomes the transparent one
    keyed = np.asarray(palette.convert("RGBA")).copy()
    keyed[..., 3] = np.where(np.asarray(palette) == index, 0, 255)
    keyed = Image.fromarray(keyed)
    deep = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 455)  # 0..65065
    cmyk = Image.fromarray(rgb).convert("CMYK")
    bits = Image.fromarray(((rgb[..., 0] > 10) * 255).astype(np.uint8)).convert("1")
    return {
        "1": (png(bits), bits.convert("RGB")),
        "L": (png(grey), grey.convert("RGB")),
        "LA": (png(la), seen_la),
        "P": (png(palette), palette.convert("RGB")),
        "P+transparency": (png(palette, transparency=index),
                           Image.alpha_composite(white, keyed).convert("RGB")),
        "RGB": (png(Image.fromarray(rgb)), Image.fromarray(rgb)),
        "RGBA": (png(rgba), seen),
        "I;16": (png(Image.fromarray(deep)),
                 Image.fromarray(np.rint(deep / 257).astype(np.uint8)).convert("RGB")),
        "CMYK": (png(cmyk, "TIFF"), cmyk.convert("RGB")),
    }


CASES = files()


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_as_a_viewer_shows_it(tmp_path, case, mode):
    data, reference = CASES[case]
    path = tmp_path / "img.png"
    path.write_bytes(data)
    store = decode_files({"c": [path]}, SIZE, mode)
    got = store.images[0, 0].permute(1, 2, 0).numpy()
    want = np.asarray(reference.convert(mode)).reshape(SIZE, SIZE, -1)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (case, mode, got[..., 0])
    code, width, height, flags = store.origin[0, 0].tolist()
    opened = Image.open(io.BytesIO(data))
    assert (PIL_MODES[code], width, height) == (opened.mode, SIZE, SIZE)
    transparent = case in ("LA", "P+transparency", "RGBA")
    assert bool(flags & COMPOSITED) == transparent and bool(flags & RESCALED) == (case == "I;16")


def test_the_composite_is_the_definition_over_white():
    rgb, alpha = source()
    data, _ = CASES["RGBA"]
    img, flags = images.as_seen(Image.open(io.BytesIO(data)), "RGB")
    assert flags == COMPOSITED
    assert np.abs(np.asarray(img).astype(int) - over_white(rgb, alpha).astype(int)).max() <= 1
    page = np.asarray(img)[0, 0]
    assert page.tolist() == [255, 255, 255]  # the transparent page is white, not black


def test_deep_grey_and_float_span_the_viewers_range(tmp_path):
    rng = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0..65535
    tiff_float = png(Image.fromarray((rng / 65535).astype(np.float32)), "TIFF")
    keyed = png(Image.fromarray(rng), transparency=int(rng[0, 0]))  # 16-bit grey with tRNS
    for name, data in (("f.tif", tiff_float), ("k.png", keyed)):
        (tmp_path / name).write_bytes(data)
    store = decode_files({"c": [tmp_path / "f.tif", tmp_path / "k.png"]}, 4, "L")
    want = np.rint(rng / 257).astype(np.uint8)
    assert np.abs(store.images[0, 0, 0].numpy().astype(int) - want).max() <= 1
    keyed_out = store.images[0, 1, 0].numpy()
    assert keyed_out[0, 0] == 255  # the transparent grey value shows the white page
    assert np.abs(keyed_out.astype(int) - want).ravel()[1:].max() <= 1


def test_equal_pixels_in_two_formats_have_one_digest(tmp_path):
    rgb, _ = source()
    (tmp_path / "a.png").write_bytes(png(Image.fromarray(rgb)))
    (tmp_path / "b.bmp").write_bytes(png(Image.fromarray(rgb), "BMP"))
    (tmp_path / "c.png").write_bytes(png(Image.fromarray(255 - rgb)))
    store = decode_files({"x": [tmp_path / "a.png", tmp_path / "b.bmp"],
                          "y": [tmp_path / "c.png"]}, 6, "RGB")
    assert store.digests[0, 0] == store.digests[0, 1] != store.digests[1, 0]
    assert store.digests[1, 1] == 0  # padding
    assert torch.equal(store.counts, torch.tensor([2, 1]))
