"""Meta-steps per second of data-parallel MAML (torchrun) against one process, same machine.

Runs the real CLI: ``fewshot train experiment=maml_omniglot_5w1s`` (second-order MAML, Conv4-64,
5-way 1-shot, meta-batch 32) for ``--steps`` meta-steps, once as one process using every core
and once per process count under ``torchrun`` (the cores shared out), in turn for ``--runs``
rounds. Each meta-step's time comes back from the run's TensorBoard events (logged every step);
the first ``--warmup`` steps of each run are dropped. Prints the median meta-step time, the
meta-steps per second and the speed-up over one process.

    python scripts/bench_ddp.py --processes 1 2 --runs 3 --steps 8 --warmup 2
    python scripts/bench_ddp.py --device cuda --processes 1 2 4      # on a GPU machine

The images are generated glyphs of Omniglot's shape (28x28x1) unless ``--omniglot ROOT`` names a
real copy: the arithmetic of a meta-step does not depend on what the images show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def step_times(run_dir: Path, meta_batch: int) -> list[float]:
    """Seconds per meta-step, one per logged step, from ``train/episodes_per_s``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [meta_batch / e.value for e in events.Scalars("train/episodes_per_s")]


def one_run(processes: int, args: argparse.Namespace, folder: Path) -> list[float]:
    cores = os.cpu_count() or 1
    data = (["dataset=omniglot", f"dataset.root={args.omniglot}"] if args.omniglot else
            ["dataset=glyphs", "dataset.classes.train=100", "dataset.classes.val=20",
             "dataset.classes.test=20"])
    train = ["train", "experiment=maml_omniglot_5w1s", *data, f"device={args.device}",
             f"train.steps={args.steps}", f"train.val_every={args.steps}", "train.log_every=1",
             "train.val_episodes=16", f"train.meta_batch={args.meta_batch}",
             f"hydra.run.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))}
    if processes == 1:
        command = [sys.executable, "-m", "fewshot_cli", *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", "fewshot_cli", *train]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return step_times(folder, args.meta_batch)[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3, help="rounds; each runs every count once")
    parser.add_argument("--steps", type=int, default=8, help="meta-steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run not timed")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--omniglot", default=None, help="a real Omniglot root (optional)")
    args = parser.parse_args()

    times: dict[int, list[float]] = {n: [] for n in args.processes}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.runs):
            for n in args.processes:
                times[n] += one_run(n, args, Path(tmp) / f"r{round_}-p{n}")
                print(f"round {round_ + 1}/{args.runs}, {n} process(es): "
                      f"{statistics.median(times[n]):.3f} s per meta-step so far", file=sys.stderr)

    cores = os.cpu_count() or 1
    base = statistics.median(times[args.processes[0]])
    print(f"\nMAML Omniglot 5w1s (Conv4-64, second order, meta-batch {args.meta_batch}) on "
          f"{args.device}, {cores} cores; median of {args.runs} runs x "
          f"{args.steps - args.warmup} timed meta-steps\n")
    print("| processes | threads each | meta-step (s) | meta-steps/s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in args.processes:
        median = statistics.median(times[n])
        print(f"| {n} | {max(1, cores // n)} | {median:.3f} | {1 / median:.3f} | "
              f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()
