"""Training steps per second under ``device.threads=auto`` against torch's default threads and
against one thread, on an idle machine and beside 1 and 3 busy processes, for three presets
(RL² bandits, ProtoNet Omniglot, MAML Omniglot; image presets on the generated glyphs at the
preset's shape, as scripts/time_presets.py times them). Prints one table; the ratios compare
settings measured in the same run.

- ``default``: what fewshot did before ``device.threads``: torch's thread count (one per core)
  and OpenMP's default wait policy (waiting threads spin);
- ``one``: one thread (``OMP_NUM_THREADS=1``);
- ``auto``: what ``fewshot train`` does now: ``device.threads=auto``, and the sleeping wait
  policy (``OMP_WAIT_POLICY=PASSIVE``) where the ``fewshot`` command finds the machine shared
  (``cli.machine_is_shared``: decided in the measuring process, beside the busy ones).

A "busy process" is a pure-Python loop that never sleeps (another user's job). The fair share of
a process beside B busy ones on C cores is min(1, C / (B + 1)) of the machine; ``auto/fair`` is
auto's speed over (the idle machine's best speed x that share): 1 means a fair share, and the
goal is at least 1 / 1.5.

    python scripts/bench_threads.py [--seconds 8] [--runs 3] [--busy 0,1,3] [PRESET ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ["rl2_bandits_k5_n10", "protonet_omniglot_5w1s", "maml_omniglot_5w1s"]
SETTINGS = {
    "default": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None, "threads": None},
    "one": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "1", "threads": None},
    "auto": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None, "threads": "auto"},
}


def child(preset: str, threads: str | None, seconds: float) -> None:
    """Run in a fresh process (the wait policy is read when torch loads): print steps/s."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if threads == "auto":  # as the fewshot command decides, before torch loads
        from fewshot_cli.cli import set_wait_policy

        set_wait_policy(["train"])
    import torch
    from time_presets import composed

    from fewshot_cli.build import set_threads, wire_run
    from fewshot_cli.engine.runtime import pad_host_heap
    from fewshot_cli.train import step_images

    pad_host_heap()
    cfg = composed(preset, glyphs=True)
    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        trainer = wire_run(cfg, torch.device("cpu"), Path(run_dir))
        line = set_threads(threads, trainer.device, trainer.algo, trainer.inputs,
                           step_images(cfg, trainer)) if threads else ""
        for step in range(2):
            trainer.train_step(step)
        steps, start = 0, time.perf_counter()
        while steps < 2 or time.perf_counter() - start < seconds:
            trainer.train_step(2 + steps)
            steps += 1
        rate = steps / (time.perf_counter() - start)
    print(json.dumps({"rate": rate, "threads": torch.get_num_threads(), "line": line,
                      "policy": os.environ.get("OMP_WAIT_POLICY")}))


def spin() -> None:
    while True:
        pass


def measure(preset: str, setting: str, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    chosen = SETTINGS[setting]
    env.update({k: v for k, v in chosen.items() if k.startswith("OMP") and v is not None})
    args = [sys.executable, __file__, "--child", preset, "--seconds", str(seconds)]
    if chosen["threads"]:
        args += ["--threads", chosen["threads"]]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=PRESETS)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--busy", default="0,1,3", help="busy processes beside, per row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.seconds)
        return
    from fewshot_cli.engine.runtime import usable_cores

    cores = usable_cores()
    print(f"{cores} usable cores, {args.runs} runs of {args.seconds:g} s per cell (median), "
          f"steps/s; load before: {os.getloadavg()[0]:.2f}")
    print(f"| preset | busy | {' | '.join(SETTINGS)} | auto threads, wait | auto/default "
          "| auto/one | auto/fair |")
    print("|---|---:|" + "---:|" * (len(SETTINGS) + 4))
    for preset in args.presets:
        idle_best = None
        for busy in (int(b) for b in args.busy.split(",")):
            burners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
            for p in burners:
                p.start()
            try:
                cells = {s: [measure(preset, s, args.seconds) for _ in range(args.runs)]
                         for s in SETTINGS}
            finally:
                for p in burners:
                    p.terminate()
            rate = {s: statistics.median(r["rate"] for r in runs) for s, runs in cells.items()}
            if busy == 0:
                idle_best = max(rate.values())
            share = min(1.0, cores / (busy + 1))
            fair = f"{rate['auto'] / (idle_best * share):.2f}" if idle_best else "n/a"
            print(f"| {preset} | {busy} | " + " | ".join(f"{rate[s]:.2f}" for s in SETTINGS)
                  + f" | {cells['auto'][0]['threads']}"
                  f"{' passive' if cells['auto'][0]['policy'] else ''} | "
                  f"{rate['auto'] / rate['default']:.2f} | "
                  f"{rate['auto'] / rate['one']:.2f} | {fair} |", flush=True)


if __name__ == "__main__":
    main()
