"""Baseline, Baseline++, ProtoNet and Meta-Baseline on real Omniglot at equal CPU time, each
tested 5-way 1-shot and 20-way 1-shot on the same fixed test episodes.

    python scripts/compare_transfer.py --minutes M [--episodes 600] [--root DIR] [--runs DIR]
        [--record DIR] [--seed 0] [key=value ...]

Every method trains through the real ``fewshot train`` with ``train.max_minutes=M
train.budget_clock=cpu``: it stops (validating and saving first) once its training steps have
used M minutes of this process's CPU time, whatever the machine's load; each runs alone with one
thread (OMP_NUM_THREADS=1), so CPU time is one core's time. Meta-Baseline (Chen et al. 2021)
spends M/2 pretraining a linear classifier over the base classes (Classifier-Baseline) and M/2
meta-training a cosine ProtoNet with a learned scale from it (``init_from=``). Each best.pt is
then tested with ``fewshot eval`` at both shapes. Extra ``key=value`` arguments go to every
training run (``dataset.split=minimal`` for a quick look).

Writes ``<record>/omniglot_<M>min.json`` (settings, commit, machine load, per method its steps,
CPU seconds and test figures with their 95% CI) and ``<record>/omniglot_<M>min.md`` (the
table); runs and checkpoints go under ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = ((5, 1), (20, 1))  # (ways, shots) of the tests
COMMON = ["dataset=omniglot", "device=cpu", "train.budget_clock=cpu", "train.steps=100000000",
          "train.scheduler=null", "train.val_episodes=100", "eval.ways=5", "eval.shots=1"]
# Settings of each method (and validations per budget minute, roughly: steps/min differ 6-fold).
METHODS = {
    "Baseline": (["algo=baseline", "algo.classifier=linear", "train.batch_size=64"], 400),
    "Baseline++": (["algo=baseline", "algo.classifier=cosine", "train.batch_size=64"], 400),
    "ProtoNet": (["algo=protonet", "train.ways=60", "train.shots=1", "train.queries=5"], 60),
}
# Meta-Baseline's second stage: the paper's episodes (5-way, 15 queries, 4 per step) and
# optimiser (SGD 0.001, momentum 0.9, weight decay 5e-4: configs/train_meta_mini.yaml).
META_STAGE = (["algo=protonet", "algo.distance=cosine", "algo.learn_scale=true", "train.ways=5",
               "train.shots=1", "train.queries=15", "train.meta_batch=4", "train.lr=0.001",
               "train.optimizer._target_=torch.optim.SGD", "+train.optimizer.momentum=0.9",
               "+train.optimizer.weight_decay=0.0005"], 80)


def fewshot(args: list[str], log: Path) -> None:
    """Run ``fewshot <args>`` with one thread; its output goes to ``log``; stop on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as out:
        out.write(f"$ fewshot {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", "fewshot_cli", *args], env=env,
                              stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"fewshot {args[0]} failed ({proc.returncode}); see {log}")


def train(run: Path, settings: list[str], minutes: float, every: int, common: list[str],
          log: Path) -> dict:
    """One budgeted training run; what its last checkpoint says about it."""
    val_every = max(20, round(every * minutes))
    fewshot(["train", *common, *settings, f"train.max_minutes={minutes}",
             f"train.val_every={val_every}", f"hydra.run.dir={run}"], log)
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return {"run": str(run), "overrides": settings, "steps": last["step"],
            "cpu_seconds": round(last["trained_seconds"], 1), "best_step": last["best"]["step"]}


def test(run: Path, episodes: int, log: Path) -> dict[str, dict]:
    """``fewshot eval`` of the run's best.pt at every shape of SHAPES, read from results.json."""
    figures = {}
    for ways, shots in SHAPES:
        fewshot(["eval", f"ckpt={run / 'best.pt'}", f"eval.ways={ways}", f"eval.shots={shots}",
                 "eval.queries=15", f"eval.episodes={episodes}"], log)
        entries = json.loads((run / "results.json").read_text())["best.pt"].values()
        found = [r for r in entries if (r["ways"], r["shots"], r["episodes"], r["queries"]) ==
                 (ways, shots, episodes, 15)]
        if not found:
            sys.exit(f"{run / 'results.json'} holds no {ways}-way {shots}-shot result")
        figures[f"{ways}-way {shots}-shot"] = {"accuracy": found[-1]["accuracy"],
                                              "ci95": found[-1]["ci95"], "episodes": episodes,
                                              "seed": found[-1]["seed"]}
    return figures


def table(record: dict) -> str:
    """The Markdown table of a record."""
    shapes = [f"{w}-way {s}-shot" for w, s in SHAPES]
    lines = ["| method | training CPU time | steps | " + " | ".join(shapes) + " |",
             "|---|---:|---:|" + "---:|" * len(shapes)]
    for name, m in record["methods"].items():
        cells = [f"{100 * m['test'][s]['accuracy']:.2f}% ± {100 * m['test'][s]['ci95']:.2f}%"
                 for s in shapes]
        lines.append(f"| {name} | {m['cpu_seconds'] / 60:.2f} min | {m['steps']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, text=True,
                               capture_output=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True,
                        help="CPU minutes of training steps per method")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes per shape")
    parser.add_argument("--root", default=os.path.join(os.environ.get("FEWSHOT_DATA", "."),
                                                       "omniglot"))
    parser.add_argument("--runs", default=None, help="where the runs go (default: outputs/...)")
    parser.add_argument("--record", default=str(REPO / "reproductions" / "transfer_omniglot"))
    parser.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    runs = Path(args.runs or REPO / "outputs" / "compare_transfer" / stamp).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "commands.log"
    common = [*COMMON, f"dataset.root={args.root}", f"seed={args.seed}", *extra]
    record = {"command": " ".join(["python scripts/compare_transfer.py", *sys.argv[1:]]),
              "commit": commit(), "started": stamp, "machine": {
                  "cpus": os.cpu_count(), "torch": torch.__version__,
                  "python": platform.python_version(), "load_before": os.getloadavg()},
              "budget": {"minutes_per_method": args.minutes, "clock": "cpu", "threads": 1},
              "common": common, "methods": {}}
    for name, (settings, every) in METHODS.items():
        print(f"{name}: training for {args.minutes} CPU minutes ...", flush=True)
        run = runs / name.lower().replace("+", "p")
        record["methods"][name] = train(run, settings, args.minutes, every, common, log)
        record["methods"][name]["test"] = test(run, args.episodes, log)
    print("Meta-Baseline: classifier stage, then meta stage ...", flush=True)
    half = args.minutes / 2
    first = train(runs / "meta_baseline_classifier", METHODS["Baseline"][0], half,
                  METHODS["Baseline"][1], common, log)
    settings, every = META_STAGE
    second = train(runs / "meta_baseline", [*settings, f"init_from={first['run']}/best.pt"], half,
                   every, common, log)
    second["test"] = test(Path(second["run"]), args.episodes, log)
    second["stages"] = {"classifier": first}
    second["steps"] = f"{first['steps']} + {second['steps']}"
    second["cpu_seconds"] = round(first["cpu_seconds"] + second["cpu_seconds"], 1)
    record["methods"]["Meta-Baseline"] = second
    record["machine"]["load_after"] = os.getloadavg()
    out = Path(args.record)
    out.mkdir(parents=True, exist_ok=True)
    name = f"omniglot_{args.minutes:g}min"
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(record)
    (out / f"{name}.md").write_text(
        f"Omniglot, {args.minutes:g} CPU minutes of training per method (one thread), "
        f"{args.episodes} test episodes per shape; `{record['command']}` at {record['commit']}, "
        f"load average {record['machine']['load_before'][0]:.1f} before, "
        f"{record['machine']['load_after'][0]:.1f} after.\n\n{text}\n")
    print(text)
    print(f"records written to {out / name}.json and .md; runs in {runs}")


if __name__ == "__main__":
    main()
