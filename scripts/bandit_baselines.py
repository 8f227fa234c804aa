"""The classical bandit baselines of Duan et al. (2016, Table 1) on fewshot's test trials, with
their parameters grid-searched per setting as the paper did ("a separate grid search for each of
the experimental settings"; they searched on their evaluation instances, this searches on
fewshot's validation trials and never on the test ones).

    python scripts/bandit_baselines.py                            # all nine settings of Table 1
    python scripts/bandit_baselines.py --settings 5x10 10x100 --trials 1000

For each ARMSxPULLS setting it prints the grid (validation means), the best values (to write into
a preset's ``dataset.epsilon``, ``dataset.ucb_c``, ``dataset.ots_samples``), then one markdown
row per setting: ours on the test trials of ``fewshot eval`` (split "test", ``eval.seed`` 2024,
1000 trials) beside the paper's figure. Thompson sampling's posterior draws follow how trials
are grouped, so TS/OTS differ from ``fewshot eval``'s (batches of ``eval.batch``) by noise.
"""

from __future__ import annotations

import argparse
import time

import torch

from fewshot_cli.data import bandit_policies as policies
from fewshot_cli.data.bandits import Bandits

GRIDS = {
    "epsilon": ([i / 10 for i in range(11)], policies.epsilon_greedy),
    "ucb_c": ([i / 10 for i in range(11)], policies.ucb1),
    "ots_samples": ([1, 2, 4, 8, 16, 32], policies.optimistic_thompson),
}
# Duan et al. 2016, Table 1 (arXiv:1611.02779): Random, Gittins, TS, OTS, UCB1, eps-Greedy, Greedy
PAPER = {
    (5, 10): (5.0, 6.6, 5.7, 6.5, 6.7, 6.6, 6.6), (10, 10): (5.0, 6.6, 5.5, 6.2, 6.7, 6.6, 6.6),
    (50, 10): (5.1, 6.5, 5.2, 5.5, 6.6, 6.5, 6.5),
    (5, 100): (49.9, 78.3, 74.7, 77.9, 78.0, 75.4, 74.8),
    (10, 100): (49.9, 82.8, 76.7, 81.4, 82.4, 77.4, 77.1),
    (50, 100): (49.8, 85.2, 64.5, 67.7, 84.3, 78.3, 78.0),
    (5, 500): (249.8, 405.8, 402.0, 406.7, 405.8, 388.2, 380.6),
    (10, 500): (249.0, 437.8, 429.5, 438.9, 437.1, 408.0, 395.0),
    (50, 500): (249.6, 463.7, 427.2, 437.6, 457.6, 413.6, 402.8),
}
ORDER = ("random", "Gittins", "TS", "OTS", "UCB1", "epsilon-greedy", "greedy")


def tune(arms: int, pulls: int, trials: int, seed: int) -> dict[str, float]:
    """The best value of each baseline parameter on ``trials`` validation trials."""
    sampler = Bandits(arms=arms, pulls=pulls).sampler("val", {}, trials, "cpu")
    tasks = next(sampler.fixed(trials, seed=seed))
    best = {}
    for key, (grid, policy) in GRIDS.items():
        means = {value: float(policy(tasks, value).mean()) for value in grid}
        best[key] = max(means, key=means.get)
        print(f"k={arms} n={pulls} {key}: " + ", ".join(f"{v}: {m:.2f}" for v, m in
                                                         means.items()), flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=[f"{k}x{n}" for k, n in PAPER],
                        help="ARMSxPULLS")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024, help="eval.seed (validation: +1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for setting in args.settings:
        arms, pulls = (int(x) for x in setting.split("x"))
        start = time.perf_counter()
        best = tune(arms, pulls, args.trials, args.seed + 1)
        dataset = Bandits(arms=arms, pulls=pulls, **best)
        tasks = next(dataset.sampler("test", {}, args.trials, "cpu").fixed(args.trials,
                                                                              args.seed))
        scores = dataset.baselines(tasks)
        print(f"k={arms} n={pulls}: " + " ".join(f"dataset.{k}={v}" for k, v in best.items())
              + f" ({time.perf_counter() - start:.0f} s)\n", flush=True)
        paper = PAPER.get((arms, pulls), ("?",) * len(ORDER))
        cells = [f"{p} / {'—' if scores[m] is None else f'{float(scores[m].mean()):.1f}'}"
                 for m, p in zip(ORDER, paper, strict=True)]
        rows.append(f"| n={pulls}, k={arms} | " + " | ".join(cells) + " |")
    print("| setup | " + " | ".join(ORDER) + " |  (paper / ours)")
    print("|---|" + "---:|" * len(ORDER))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
