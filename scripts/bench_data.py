"""Does the data path keep up? Episodes/s of the sampler alone against the meta-step it feeds,
and the miniImageNet cache's build and load times.

    python scripts/bench_data.py                  # CPU
    python scripts/bench_data.py --device cuda

Sampler: ``EpisodeSampler.sample()`` (uint8 store on the device -> float episode) on random
uint8 stores of the real shapes: Omniglot with rotations (4800 classes x 20, 28x28x1, 5-way
1-shot 15 queries, meta-batch 32) and miniImageNet train (64 classes x 600, 84x84x3, 5-way 1-shot
15 queries, meta-batch 4), the latter also with the on-device augmentation (``augment=standard``:
crop 8 px, flip, colour jitter 0.4). Meta-step: one second-order MAML meta-update (adapt every
task, query loss, backward, Adam) built from the presets ``maml_omniglot_5w1s`` /
``maml_miniimagenet_5w1s`` (Conv4-64 1 inner step / Conv4-32 5 inner steps), fed with a sampled
episode. Each figure is the
median of ``--runs`` timings. The ratio is sampler episodes/s over the episodes/s a meta-step
consumes (one task of the meta-batch = one episode).

Cache: a fake miniImageNet train folder of random-content 84x84 JPEGs (``--classes`` x
``--images``) is decoded into its cache (build), then opened again as a new run would (list and
fingerprint the files, memory-map the cache, first episode). Build scales with the image count,
so it is also given per Ravi split size; the full-size (813 MB) train cache's load is measured
directly on a random store of that size.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SPLIT_IMAGES = {"train": 64 * 600, "val": 16 * 600, "test": 20 * 600}
SHAPES = {
    "omniglot": dict(title="Omniglot+rot", classes=4800, images=20, channels=1, size=28,
                     meta_batch=32, preset="maml_omniglot_5w1s"),
    "miniimagenet": dict(title="miniImageNet", classes=64, images=600, channels=3, size=84,
                         meta_batch=4, preset="maml_miniimagenet_5w1s"),
}


def timed(fn, sync, repeat: int = 1) -> float:
    """Seconds per call of ``fn``, over ``repeat`` calls."""
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def random_store(c: dict):
    from fewshot_cli.data.store import ClassStore

    images = torch.randint(0, 256, (c["classes"], c["images"], c["channels"], c["size"],
                                    c["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return ClassStore(images, [f"c{i}" for i in range(c["classes"])])


def meta_step(c: dict, device: torch.device):
    """A zero-argument meta-step on one sampled episode, and what it is."""
    from hydra import compose, initialize_config_dir

    from fewshot_cli.build import build_algorithm, build_optimizer
    from fewshot_cli.data.store import ClassStore

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"experiment={c['preset']}", "train.queries=15"])
    tiny = ClassStore(torch.zeros(2, 1, c["channels"], c["size"], c["size"], dtype=torch.uint8),
                      ["a", "b"])
    algo = build_algorithm(cfg, tiny, device).train()
    optimizer, _ = build_optimizer(cfg, algo)
    what = (f"MAML {'2nd' if not cfg.algo.first_order else '1st'} order, Conv4-"
            f"{cfg.backbone.hidden}, {cfg.algo.inner_steps} inner step(s)")

    def run(episode) -> None:
        optimizer.zero_grad(set_to_none=True)
        algo.loss(episode)[0].backward()
        optimizer.step()

    return run, what


def bench_sampler(name: str, device: torch.device, runs: int, sync) -> list[dict]:
    from fewshot_cli.data.augment import Standard
    from fewshot_cli.data.sampler import EpisodeSampler

    c = SHAPES[name]
    store = random_store(c)
    sampler = EpisodeSampler(store, 5, 1, 15, c["meta_batch"], device, seed=0)
    augmented = EpisodeSampler(store, 5, 1, 15, c["meta_batch"], device, seed=0,
                               augment=Standard(crop_padding=8, flip=True, color_jitter=0.4))
    sample_augmented = augmented.sample

    step, what = meta_step(c, device)
    episode = sampler.sample()
    for _ in range(2):  # warm-up: allocator, kernels, oneDNN primitives
        sampler.sample()
        sample_augmented()
    step(episode)
    t_sample = statistics.median(timed(sampler.sample, sync, 20) for _ in range(runs))
    t_step = statistics.median(timed(lambda: step(episode), sync) for _ in range(runs))
    shape = (f"{c['classes']}x{c['images']}x{c['channels']}x{c['size']}x{c['size']}, 5w1s15q, "
             f"meta-batch {c['meta_batch']}")
    rows = [dict(data=c["title"], shape=shape, sampler="sampler", t_sample=t_sample,
                 what=what, t_step=t_step, b=c["meta_batch"])]
    if name == "miniimagenet":
        t_aug = statistics.median(timed(sample_augmented, sync, 20) for _ in range(runs))
        rows.append(dict(rows[0], sampler="sampler + on-device augmentation", t_sample=t_aug))
    return rows


def fake_folder(root: Path, classes: int, images: int) -> None:
    """``root/train/<wnid>/*.jpg``: smooth random colour images, like photos in JPEG size."""
    from fewshot_cli.data.miniimagenet import encode_jpeg

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        low = torch.rand(images, 3, 12, 12, generator=g)
        pixels = (torch.nn.functional.interpolate(low, size=84, mode="bicubic").clamp(0, 1)
                  * 255).to(torch.uint8)
        for i in range(images):
            (folder / f"n{c:08d}{i + 1:08d}.jpg").write_bytes(encode_jpeg(pixels[i]))


def bench_cache(classes: int, images: int, runs: int, device: torch.device, sync) -> dict:
    from fewshot_cli.data.miniimagenet import MiniImageNet
    from fewshot_cli.data.sampler import EpisodeSampler
    from fewshot_cli.data.store import ClassStore

    builds, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fake_folder(Path(tmp) / "mini", classes, images)
        root = Path(tmp) / "mini"
        for _ in range(max(1, runs // 2)):  # builds are long: fewer of them
            for f in (root / ".fewshot-cache").glob("*"):
                f.unlink()
            builds.append(timed(lambda: MiniImageNet(str(root)).load("train"), sync))

        def second_start() -> None:
            store = MiniImageNet(str(root)).load("train")
            EpisodeSampler(store, 5, 1, 15, 4, device).sample()

        loads = [timed(second_start, sync) for _ in range(runs)]
        full = random_store(SHAPES["miniimagenet"])
        path = Path(tmp) / "full.pt"
        full.save(path)
        del full

        def full_start() -> None:
            store = ClassStore.load(path)
            EpisodeSampler(store, 5, 1, 15, 4, device).sample()

        full_loads = [timed(full_start, sync) for _ in range(runs)]
    n = classes * images
    build = statistics.median(builds)
    return dict(n=n, build=build, load=statistics.median(loads),
                full_load=statistics.median(full_loads), per_image=build / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=64, help="fake cache: classes")
    parser.add_argument("--images", type=int, default=60, help="fake cache: images per class")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args()
    # glibc hands large freed blocks back to the OS and faults them in again each step; that
    # slows the meta-step (flattering the ratio), so measure with the settings bench_maml uses.
    tuned = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
             "MALLOC_TOP_PAD_": "1073741824"}
    if any(os.environ.get(k) != v for k, v in tuned.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **tuned})
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    device = torch.device(args.device)
    # the fake cache is not Ravi-sized on purpose: its warning is noise here
    logging.getLogger("fewshot_cli.data.miniimagenet").setLevel(logging.ERROR)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    host = (torch.cuda.get_device_name() if device.type == "cuda" else
            f"CPU, {torch.get_num_threads()} threads")

    rows = [r for name in SHAPES for r in bench_sampler(name, device, args.runs, sync)]
    print(f"**Sampler against the meta-step it feeds** ({host}, torch {torch.__version__}, "
          f"median of {args.runs})\n")
    print("| data | store, episode | data path | ms / meta-batch | episodes/s | meta-step | "
          "ms / meta-step | episodes/s consumed | ratio |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['data']} | {r['shape']} | {r['sampler']} | {1000 * r['t_sample']:.2f} | "
              f"{r['b'] / r['t_sample']:.0f} | {r['what']} | {1000 * r['t_step']:.0f} | "
              f"{r['b'] / r['t_step']:.1f} | {r['t_step'] / r['t_sample']:.0f}× |")
    if args.skip_cache:
        return
    c = bench_cache(args.classes, args.images, args.runs, device, sync)
    print(f"\n**miniImageNet cache** (folder layout, {c['n']} random-content 84x84 JPEGs; "
          f"{host})\n")
    print("| step | measured | per Ravi split (build scaled by image count) |")
    print("| --- | ---: | --- |")
    per_split = ", ".join(f"{s} {c['per_image'] * n:.0f} s" for s, n in SPLIT_IMAGES.items())
    print(f"| first run: decode {c['n']} images into the cache | {c['build']:.2f} s "
          f"({c['n'] / c['build']:.0f} images/s) | {per_split} |")
    print(f"| second run: list + fingerprint files, mmap the cache, first episode | "
          f"{c['load']:.2f} s | file listing grows with the split |")
    print(f"| full-size train cache (64x600, 813 MB): mmap + to {device.type} + first episode | "
          f"{c['full_load']:.2f} s | train as measured |")


if __name__ == "__main__":
    main()
