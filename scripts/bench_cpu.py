"""CPU speed of the Conv4 embedding under the process settings `fewshot` applies on the CPU.

Three settings, each in a fresh process (the heap setting cannot be undone inside one):
``default`` (plain PyTorch), ``heap-pad`` (``pad_host_heap``: glibc grows and keeps the heap in
1 GiB steps instead of mapping and zeroing every large activation anew), and
``heap-pad+channels_last`` (what ``fewshot train``/``eval`` do on the CPU for every algorithm
but MAML). Prints a Markdown table: median time per image of a no-grad forward at several batch
sizes (evaluation) and of a forward+backward of a 120-image training episode, with the speed-up
over ``default`` measured in the same run.

    python scripts/bench_cpu.py [--runs 7] [--hidden 64] [--size 28]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SETTINGS = ["default", "heap-pad", "heap-pad+channels_last"]
EVAL_BATCHES = [80, 320, 1280]  # 1, 4 and 16 episodes of 5-way 1-shot 15 queries
TRAIN_BATCH = 120  # a 20-way 1-shot 5-query (or 60-way 1-shot 1-query) episode


def measure(setting: str, runs: int, hidden: int, size: int) -> dict[str, float]:
    """Median milliseconds per image (eval) and per episode (train) under one setting."""
    if setting.startswith("heap-pad"):
        from fewshot_cli.engine.runtime import pad_host_heap

        pad_host_heap()
    import torch

    from fewshot_cli.backbones.conv4 import Conv4

    torch.manual_seed(0)
    net = Conv4(1, size, hidden)
    if setting.endswith("channels_last"):
        net = net.to(memory_format=torch.channels_last)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    out = {}
    net.eval()
    with torch.no_grad():
        for batch in EVAL_BATCHES:
            images = torch.rand(batch, 1, size, size)
            out[f"eval{batch}"] = median_ms(lambda x=images: net(x)) / batch
    net.train()
    images = torch.rand(TRAIN_BATCH, 1, size, size)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(images).sum().backward()

    out["train"] = median_ms(step)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.runs, args.hidden, args.size)))
        return
    results = {}
    for setting in SETTINGS:
        done = subprocess.run([sys.executable, __file__, "--one", setting, "--runs",
                               str(args.runs), "--hidden", str(args.hidden), "--size",
                               str(args.size)], capture_output=True, text=True, check=True)
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["default"]
    keys = [f"eval{b}" for b in EVAL_BATCHES] + ["train"]
    print(f"Conv4-{args.hidden} at {args.size}x{args.size}x1, median of {args.runs} runs; "
          f"eval: no-grad forward, us per image at batch N; train: forward+backward of "
          f"{TRAIN_BATCH} images, ms\n")
    print("| setting | " + " | ".join(f"eval N={b} (us/img)" for b in EVAL_BATCHES)
          + " | train (ms) |")
    print("| --- |" + " ---: |" * len(keys))
    for setting, row in results.items():
        cells = []
        for key in keys:
            value = row[key] * (1000 if key.startswith("eval") else 1)
            cells.append(f"{value:.0f} ({base[key] / row[key]:.2f}×)")
        print(f"| {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
