"""Meta-step time and peak memory of second-order MAML: fewshot (vmap, loop, auto) against
learn2learn and higher, each where importable, on the issue's two configurations.

    python scripts/bench_maml.py                      # CPU, both configurations
    python scripts/bench_maml.py --device cuda --precision bf16

A meta-step is: adapt every task of the meta-batch, query loss, backward, Adam step. Each
(configuration, implementation) runs in a fresh subprocess, so peak memory is its own: on CPU the
peak resident set (ru_maxrss) above the resident set before the first step, on CUDA
torch.cuda.max_memory_allocated above the memory held before it. Times are medians of --runs
meta-steps after --warmup ones, pooled over --rounds rounds; each round runs every
implementation once, in turn, so that a slow spell of the machine hits them all alike, and the
"per round" column gives the range of the speed ratios measured within one round. The
competitors follow their documentation: learn2learn ``MAML(model, lr).clone()`` + ``adapt()`` per
task, higher ``innerloop_ctx`` per task, each with a backward per task as in their MAML examples,
all on the same Conv4. Prints a Markdown table with ratios to learn2learn.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = {
    "omniglot": dict(title="Omniglot 5w1s, 15 queries, meta-batch 32, Conv4-64, 1 step, 28x28x1",
                     ways=5, shots=1, queries=15, meta_batch=32, hidden=64, steps=1, size=28,
                     channels=1, inner_lr=0.4),
    "miniimagenet": dict(title="miniImageNet 5w1s, 15 queries, meta-batch 4, Conv4-32, 5 steps, "
                               "84x84x3", ways=5, shots=1, queries=15, meta_batch=4, hidden=32,
                         steps=5, size=84, channels=3, inner_lr=0.01),
}
# fewshot-vmap/8: vmap over chunks of 8 tasks, each backpropagated at once (algo.task_chunk=8).
IMPLS = ["fewshot-auto", "fewshot-vmap", "fewshot-vmap/8", "fewshot-loop", "learn2learn", "higher"]


def implementation(name: str) -> str:
    """An --impls entry: one of IMPLS, or fewshot-vmap/N with any chunk size N."""
    chunk = name.removeprefix("fewshot-vmap/")
    if name in IMPLS or (chunk != name and chunk.isdigit() and int(chunk) > 0):
        return name
    raise argparse.ArgumentTypeError(f"unknown implementation {name!r}")


def network(c: dict, device: torch.device):
    """Conv4 with per-batch BatchNorm statistics and a linear head, as every MAML uses."""
    from fewshot_cli.backbones.conv4 import Conv4

    torch.manual_seed(0)
    body = Conv4(c["channels"], c["size"], c["hidden"], track_running_stats=False)
    return body, nn.Sequential(body, nn.Linear(body.out_features, c["ways"])).to(device)


def episode(c: dict, device: torch.device):
    g = torch.Generator().manual_seed(0)
    b, n, k, q = c["meta_batch"], c["ways"], c["shots"], c["queries"]
    image = (c["channels"], c["size"], c["size"])
    support = torch.rand(b, n * k, *image, generator=g).to(device)
    query = torch.rand(b, n * q, *image, generator=g).to(device)
    support_y = torch.arange(n).repeat_interleave(k).expand(b, -1).to(device)
    query_y = torch.arange(n).repeat_interleave(q).expand(b, -1).to(device)
    return support, support_y, query, query_y


def make_step(impl: str, c: dict, device: torch.device):
    """A zero-argument function doing one meta-step of ``impl``; None if not importable."""
    support, support_y, query, query_y = episode(c, device)
    b = c["meta_batch"]
    if impl.startswith("fewshot"):
        from fewshot_cli.algorithms.maml import MAML
        from fewshot_cli.episode import Episode

        body, _ = network(c, device)
        batching, _, chunk = impl.split("-")[1].partition("/")
        algo = MAML(body, c["ways"], inner_lr=c["inner_lr"], inner_steps=c["steps"],
                    batching=batching, task_chunk=int(chunk) if chunk else None).to(device)
        ep = Episode(support, support_y, query, query_y, c["ways"], c["shots"], c["queries"])
        opt = torch.optim.Adam(algo.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            algo.loss(ep)[0].backward()
            opt.step()

        return step
    if impl == "learn2learn":
        try:
            import learn2learn as l2l
        except ImportError:
            return None
        _, model = network(c, device)
        maml = l2l.algorithms.MAML(model, lr=c["inner_lr"], first_order=False)
        opt = torch.optim.Adam(maml.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            for t in range(b):
                learner = maml.clone()
                for _ in range(c["steps"]):
                    learner.adapt(F.cross_entropy(learner(support[t]), support_y[t]))
                (F.cross_entropy(learner(query[t]), query_y[t]) / b).backward()
            opt.step()

        return step
    if impl == "higher":
        try:
            import higher
        except ImportError:
            return None
        _, model = network(c, device)
        inner = torch.optim.SGD(model.parameters(), lr=c["inner_lr"])
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            for t in range(b):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel,
                                                                                        diffopt):
                    for _ in range(c["steps"]):
                        diffopt.step(F.cross_entropy(fmodel(support[t]), support_y[t]))
                    (F.cross_entropy(fmodel(query[t]), query_y[t]) / b).backward()
            opt.step()

        return step
    raise ValueError(impl)


def measure(impl: str, config: str, device: str, precision: str, runs: int, warmup: int) -> dict:
    """Median meta-step seconds and peak extra memory (bytes) of one implementation."""
    import psutil

    dev = torch.device(device)
    c = CONFIGS[config]
    step = make_step(impl, c, dev)
    if step is None:
        return {"impl": impl, "config": config, "skipped": "not importable"}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base_rss = psutil.Process().memory_info().rss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    with autocast:
        for i in range(warmup + runs):
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_cuda
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"impl": impl, "config": config, "median_s": statistics.median(times),
            "times": times, "peak_bytes": peak}


def pooled(rounds: list[list[dict]]) -> list[dict]:
    """One result per (configuration, implementation): the median of all its rounds' meta-step
    times, its largest peak, and the range of its per-round speed ratios to learn2learn."""
    results = []
    for first in rounds[0]:
        key = (first["config"], first["impl"])
        mine = [r for rnd in rounds for r in rnd if (r["config"], r["impl"]) == key]
        done = [r for r in mine if "median_s" in r]
        if len(done) < len(mine):
            results.append(next(r for r in mine if "median_s" not in r))
            continue
        ratios = []
        for rnd in rounds:
            anchor = next((r for r in rnd if r["config"] == key[0] and r["impl"] == "learn2learn"
                           and "median_s" in r), None)
            own = next(r for r in rnd if (r["config"], r["impl"]) == key)
            if anchor:
                ratios.append(anchor["median_s"] / own["median_s"])
        results.append({"impl": key[1], "config": key[0], "rounds": len(done),
                        "median_s": statistics.median(t for r in done for t in r["times"]),
                        "peak_bytes": max(r["peak_bytes"] for r in done),
                        "ratio_range": (min(ratios), max(ratios)) if ratios else None})
    return results


def table(results: list[dict], device: str, precision: str) -> str:
    lines = []
    for config in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == config]
        anchor = next((r for r in rows if r["impl"] == "learn2learn" and "median_s" in r), None)
        lines += [f"**{CONFIGS[config]['title']}** ({device}, {precision})", "",
                  "| implementation | median meta-step (ms) | peak memory (MiB) | speed vs "
                  "learn2learn | per round | memory vs learn2learn |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if "median_s" not in r:
                lines.append(f"| {r['impl']} | {r.get('skipped', r.get('error'))} | | | | |")
                continue
            speed = mem = spread = "n/a"
            if anchor:
                speed = f"{anchor['median_s'] / r['median_s']:.2f}×"
                mem = f"{r['peak_bytes'] / max(anchor['peak_bytes'], 1):.2f}×"
            if r.get("ratio_range"):
                low, high = r["ratio_range"]
                spread = f"{low:.2f}–{high:.2f}×"
            lines.append(f"| {r['impl']} | {1000 * r['median_s']:.1f} | "
                         f"{r['peak_bytes'] / 2**20:.0f} | {speed} | {spread} | {mem} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--impls", nargs="+", default=IMPLS, type=implementation,
                        help=f"from {' '.join(IMPLS)}; fewshot-vmap/N for chunks of N tasks")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="run every implementation this many times, in turn")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 needs --device cuda")
    if args.one:  # the child process: one measurement, printed as JSON
        print(json.dumps(measure(*args.one, args.device, args.precision, args.runs,
                                 args.warmup)))
        return
    # glibc hands large freed blocks back to the OS and page-faults them in again on the next
    # step; on a busy CPU that made every implementation up to 10x slower and noisy.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "33554432",
           "MALLOC_TRIM_THRESHOLD_": "17179869184", "MALLOC_TOP_PAD_": "1073741824"}
    rounds = []
    for _ in range(args.rounds):
        rounds.append([])
        for config in args.configs:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--one", impl, config, "--device",
                       args.device, "--precision", args.precision, "--runs", str(args.runs),
                       "--warmup", str(args.warmup)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    error = (done.stderr.strip().splitlines() or ["failed"])[-1][:80]
                    rounds[-1].append({"impl": impl, "config": config, "error": error})
                else:
                    rounds[-1].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rounds[-1][-1]), file=sys.stderr, flush=True)
    results = pooled(rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(table(results, args.device, args.precision))


if __name__ == "__main__":
    main()
