"""Kornia against the hand-written augmentation ops it replaced: is ``augment=`` on Kornia as
fast on batched episodes?

    python scripts/bench_augment.py [--device cuda] [--runs 7] [--threads 1]

The hand-written versions below are the ops fewshot had before (miniImageNet's random crop,
flip and colour jitter; Siamese's affine distortions), kept here only as the reference. Each
figure is the median over ``--runs`` timings of ``--repeat`` calls on one episode-sized batch
(hand-written and Kornia timed in turn within each run; the speed is the median per-run ratio):
miniImageNet 5-way 1-shot 15 queries, meta-batch 4 (320 images, 3x84x84) for ``standard``;
Omniglot 5w1s15q meta-batch 32 (2560 images, 1x28x28) and Siamese's 16 classes x 4 images at
105 px (64 images) for ``affine``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    m, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (m, 1, 1), device=dev)
    ox = torch.randint(0, 2 * padding + 1, (m, 1, 1), device=dev)
    rows = oy + torch.arange(h, device=dev).view(1, h, 1)
    cols = ox + torch.arange(w, device=dev).view(1, 1, w)
    index = (rows * (w + 2 * padding) + cols).view(m, 1, h * w).expand(m, c, h * w)
    return padded.flatten(2).gather(2, index).view(m, c, h, w)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def color_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    m = images.shape[0]
    gray = lambda x: (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    factor = lambda: 1 + strength * (2 * torch.rand(m, 1, 1, 1, device=images.device) - 1)
    x = (images * factor()).clamp_(0, 1)
    mean = gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = ((x - mean) * factor() + mean).clamp_(0, 1)
    g = gray(x)
    return ((x - g) * factor() + g).clamp_(0, 1)


def random_affine(images: torch.Tensor, prob: float = 0.5) -> torch.Tensor:
    m, _, h, w = images.shape
    opts = {"device": images.device, "dtype": images.dtype}

    def draw(low: float, high: float, neutral: float, n: int = 1) -> torch.Tensor:
        value = torch.empty(m, n, **opts).uniform_(low, high)
        keep = torch.rand(m, 1, **opts) < prob
        return torch.where(keep, value, torch.full_like(value, neutral))

    angle = draw(-math.pi / 18, math.pi / 18, 0.0)[:, 0]
    shear, scale = draw(-0.3, 0.3, 0.0, 2), draw(0.8, 1.2, 1.0, 2)
    shift = draw(-2.0, 2.0, 0.0, 2) * torch.tensor([2 / w, 2 / h], **opts)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([cos, -sin, sin, cos], dim=-1).view(m, 2, 2)
    shearing = torch.stack([torch.ones_like(cos), shear[:, 0], shear[:, 1],
                            torch.ones_like(cos)], dim=-1).view(m, 2, 2)
    theta = torch.cat([rotation @ shearing @ torch.diag_embed(scale), shift.unsqueeze(-1)], -1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def timed(fn, x, repeat: int, sync) -> float:
    """Seconds per call of ``fn(x)`` over ``repeat`` calls."""
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    sync()
    return (time.perf_counter() - start) / repeat


def compare(hand, kornia, x, runs: int, repeat: int, sync) -> tuple[float, float, float]:
    """Median ms of each, and the median of the per-run speed ratios; the two are timed in
    turn within each run, so that load from other processes hits both alike."""
    for _ in range(2):
        hand(x), kornia(x)
    pairs = [(timed(hand, x, repeat, sync), timed(kornia, x, repeat, sync)) for _ in range(runs)]
    return (1e3 * statistics.median(h for h, _ in pairs),
            1e3 * statistics.median(k for _, k in pairs),
            statistics.median(h / k for h, k in pairs))


def main() -> None:
    from fewshot_cli.data.augment import Affine, Standard

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = [
        ("standard", "miniImageNet 320x3x84x84", (320, 3, 84, 84),
         lambda x: color_jitter(random_flip(random_crop(x, 8)), 0.4), Standard(8, True, 0.4)),
        ("affine", "Omniglot 2560x1x28x28", (2560, 1, 28, 28), random_affine, Affine()),
        ("affine", "Siamese 64x1x105x105", (64, 1, 105, 105), random_affine, Affine()),
    ]
    print(f"| augment | batch | hand-written (ms) | Kornia (ms) | Kornia speed vs hand-written |"
          f"  ({device}, {torch.get_num_threads()} threads, median of {args.runs})")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, title, shape, hand, kornia in cases:
        x = torch.rand(shape, device=device)
        t_hand, t_kornia, ratio = compare(hand, kornia, x, args.runs, args.repeat, sync)
        print(f"| {name} | {title} | {t_hand:.1f} | {t_kornia:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
