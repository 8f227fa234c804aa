"""Where a paper preset's meta-training step spends its CPU time, and what the speed-ups give.

    python scripts/profile_preset.py [--preset protonet_omniglot_5w1s] [--threads 2]
        [--runs 20 --warmup 5 --rounds 3] [--profile] [--grad-error]

One meta-step is what ``fewshot train`` does per step: sample-free here (a fixed random episode
of the preset's training shape and image size), forward, meta-loss, backward, optimizer step.
Settings, each timed in turn within every round so a slow spell of the machine hits them all:

* ``fp32 contiguous``     float32, NCHW weights
* ``fp32 channels_last``  float32, channels_last weights (``device.memory_format=auto``)
* ``fp32 relu-then-pool`` as above with Conv4's blocks in their textbook order (conv, BN, ReLU,
  max-pool), i.e. before Conv4 pooled first (``backbones/conv4.py``)
* ``bf16 channels_last``  ``device.precision=bf16``: autocast to bfloat16 (native bf16 CPUs)
* ``bf16 contiguous``

Prints a Markdown table: median milliseconds per step over every round, steps per second, the
speed against ``fp32 channels_last`` (fewshot's default on the CPU) measured in the same round
(range over rounds), and the time a full-length preset run would take at that speed.
``--profile`` adds torch.profiler's table of the operators taking the most CPU time in the default
setting; ``--grad-error`` adds the meta-gradient's relative error (‖g - g64‖ / ‖g64‖ over all
parameters) of each precision against the same step in float64.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fewshot_cli.build import build_algorithm
from fewshot_cli.config import conf_dir
from fewshot_cli.engine.runtime import native_bf16, pad_host_heap
from fewshot_cli.episode import Episode

SETTINGS = {  # name: (precision, memory format, Conv4 block order)
    "fp32 contiguous": ("fp32", torch.contiguous_format, "pool-then-relu"),
    "fp32 channels_last": ("fp32", torch.channels_last, "pool-then-relu"),
    "fp32 relu-then-pool": ("fp32", torch.channels_last, "relu-then-pool"),
    "bf16 channels_last": ("bf16", torch.channels_last, "pool-then-relu"),
    "bf16 contiguous": ("bf16", torch.contiguous_format, "pool-then-relu"),
}
DEFAULT = "fp32 channels_last"


def preset_config(preset: str):
    """The preset composed as ``fewshot train experiment=<preset>`` composes it."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"])
    return OmegaConf.create({**OmegaConf.to_container(cfg), "choices": {}})


def episode(cfg, channels: int, size: int, dtype: torch.dtype = torch.float32) -> Episode:
    """One fixed random episode of the preset's training shape (meta-batch included)."""
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    b, n, k, q = t.meta_batch, t.ways, t.shots, t.queries
    labels = lambda per: torch.arange(n).repeat_interleave(per).expand(b, -1)
    images = lambda per: torch.rand(b, n * per, channels, size, size, generator=g).to(dtype)
    return Episode(images(k), labels(k), images(q), labels(q), n, k, q)


def textbook_order(algo: torch.nn.Module) -> None:
    """Conv4 blocks back to conv, BN, ReLU, max-pool (the order before pooling came first)."""
    for block in algo.modules():
        names = [type(m).__name__ for m in block.children()]
        if isinstance(block, torch.nn.Sequential) and names[-2:] == ["MaxPool2d", "ReLU"]:
            block[-2], block[-1] = block[-1], block[-2]


def model(cfg, setting: str):
    """The preset's algorithm on the CPU in ``setting``'s layout and block order, its
    optimizer, and its autocast context."""
    precision, layout, order = SETTINGS[setting]
    torch.manual_seed(0)
    algo = build_algorithm(cfg, {"in_channels": 1, "image_size": cfg.dataset.image_size})
    if order == "relu-then-pool":
        textbook_order(algo)
    algo = algo.to(memory_format=layout).train()
    optimizer = torch.optim.Adam(algo.parameters(), cfg.train.lr)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    return algo, optimizer, autocast


def step_fn(cfg, setting: str):
    algo, optimizer, autocast = model(cfg, setting)
    tasks = episode(cfg, 1, cfg.dataset.image_size)

    def step() -> None:
        with autocast():
            loss, _ = algo.meta_loss(tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timings(cfg, settings: list[str], runs: int, warmup: int, rounds: int
            ) -> dict[str, list[list[float]]]:
    """Seconds per step of each setting: ``[round][run]``; settings take turns each round."""
    steps = {s: step_fn(cfg, s) for s in settings}
    for step in steps.values():
        for _ in range(warmup):
            step()
    out: dict[str, list[list[float]]] = {s: [] for s in settings}
    for _ in range(rounds):
        for setting, step in steps.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            out[setting].append(times)
    return out


def table(cfg, times: dict[str, list[list[float]]]) -> str:
    base = [statistics.median(r) for r in times[DEFAULT]]
    rows = ["| setting | ms / step | steps / s | speed vs fp32 channels_last (per round) | "
            f"{cfg.train.steps} steps |", "|---|---:|---:|---|---:|"]
    for setting, per_round in times.items():
        median = statistics.median(t for r in per_round for t in r)
        ratios = [b / statistics.median(r) for b, r in zip(base, per_round, strict=True)]
        hours, rest = divmod(median * cfg.train.steps, 3600)
        rows.append(f"| {setting} | {1000 * median:.1f} | {1 / median:.2f} | "
                    f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                    f"{int(hours)} h {rest / 60:02.0f} min |")
    return "\n".join(rows)


def gradient(cfg, precision: str) -> list[torch.Tensor]:
    """The meta-gradient of one fixed step in ``precision`` (fp64 for the reference)."""
    torch.manual_seed(0)
    algo = build_algorithm(cfg, {"in_channels": 1, "image_size": cfg.dataset.image_size}).train()
    dtype = torch.float64 if precision == "fp64" else torch.float32
    algo = algo.to(dtype)
    tasks = episode(cfg, 1, cfg.dataset.image_size, dtype)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else \
        contextlib.nullcontext()
    with context:
        loss, _ = algo.meta_loss(tasks)
    grads = torch.autograd.grad(loss, [p for p in algo.parameters() if p.requires_grad],
                                allow_unused=True)
    return [g.double() for g in grads if g is not None]


def gradient_errors(cfg) -> str:
    reference = torch.cat([g.flatten() for g in gradient(cfg, "fp64")])
    rows = ["| precision | relative meta-gradient error vs float64 |", "|---|---:|"]
    for precision in ("fp32", "bf16"):
        g = torch.cat([x.flatten() for x in gradient(cfg, precision)])
        rows.append(f"| {precision} | {float((g - reference).norm() / reference.norm()):.2e} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="protonet_omniglot_5w1s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--grad-error", action="store_true")
    args = parser.parse_args()
    pad_host_heap()  # as fewshot train does
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset)
    settings = args.settings if native_bf16() else [s for s in args.settings if "bf16" not in s]
    if DEFAULT not in settings:
        settings.insert(0, DEFAULT)
    t = cfg.train
    print(f"{args.preset}: {t.ways}-way {t.shots}-shot {t.queries} queries, meta-batch "
          f"{t.meta_batch}, {cfg.dataset.image_size} px; {args.threads} thread(s), native bf16: "
          f"{native_bf16()}; median of {args.runs} steps x {args.rounds} rounds after "
          f"{args.warmup} warm-up steps\n")
    print(table(cfg, timings(cfg, settings, args.runs, args.warmup, args.rounds)))
    if args.grad_error:
        print("\n" + gradient_errors(cfg))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = step_fn(cfg, DEFAULT)
        for _ in range(args.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.runs):
                step()
        print(f"\ntorch.profiler, {DEFAULT}, {args.runs} steps:\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
