"""What pruning saves in a search: the same Optuna search (same space, same sampler seed) with
the median pruner and without, on the generated glyphs; wall time, training steps run, trials
pruned and the best validation accuracy found.

    python scripts/bench_search.py [--trials 12] [--steps 48] [--repeats 1] [--first median]
        [key=value ...]

Each search is a real ``fewshot train hparams_search=protonet_omniglot`` in a temporary folder
with its own SQLite study, read back with Optuna. Runs alternate (pruned, unpruned, unpruned,
pruned, ...; --first none starts the other way) so that a change in the machine's load falls on
both; the table shows the median over repeats and the ratio pruned / unpruned. Steps run do not
depend on the load; wall time does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

SEARCH = ["hparams_search=protonet_omniglot", "dataset=glyphs", "device=cpu", "backbone.hidden=8",
          "train.ways=5", "train.val_episodes=20", "eval.ways=20", "eval.queries=5"]


def search(pruner: str, trials: int, steps: int, extra: list[str]) -> dict[str, float]:
    """One search in a fresh folder: its wall time and what its study holds."""
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        db = Path(tmp) / "study.db"
        args = [*SEARCH, f"train.steps={steps}", f"train.val_every={max(steps // 6, 1)}",
                f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.pruner={pruner}",
                f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={tmp}/sweep", *extra]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fewshot_cli", "train", *args], cwd=tmp,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"search failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        study = optuna.load_study(study_name="protonet_omniglot", storage=f"sqlite:///{db}")
        done = study.trials
        return {"wall_s": wall,
                "steps_run": sum(max(t.intermediate_values, default=0) for t in done),
                "pruned": sum(t.state.name == "PRUNED" for t in done),
                "best_val_acc": 100 * study.best_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--first", choices=("median", "none"), default="median")
    args, extra = parser.parse_known_args()
    results: dict[str, list[dict[str, float]]] = {"median": [], "none": []}
    order = ["median", "none"] if args.first == "median" else ["none", "median"]
    for repeat in range(args.repeats):
        for pruner in order if repeat % 2 == 0 else order[::-1]:
            results[pruner].append(search(pruner, args.trials, args.steps, extra))
            print(f"pruner={pruner}: {results[pruner][-1]}", flush=True)
    print(f"\n{args.trials} trials of {args.steps} steps, {args.repeats} repeat(s), load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {' '.join(SEARCH + extra)}\n")
    keys = ("wall_s", "steps_run", "pruned", "best_val_acc")
    print("| pruner | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    median = {p: {k: statistics.median(r[k] for r in rs) for k in keys}
              for p, rs in results.items()}
    for pruner, row in median.items():
        print(f"| {pruner} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    ratio = [median["median"][k] / median["none"][k] if median["none"][k] else float("nan")
             for k in keys]
    print("| median / none | " + " | ".join(f"{r:.2f}" for r in ratio) + " |")


if __name__ == "__main__":
    main()
