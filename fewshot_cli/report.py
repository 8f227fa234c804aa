"""``fewshot report DIR``: summarise a sweep, or any folder of runs: a table, a CSV and a plot.

A run folder is one holding ``.hydra/config.yaml`` (written by ``fewshot train``) with its
``.hydra/overrides.yaml``, ``train.log``, ``last.pt``/``best.pt``, TensorBoard events and, once
evaluated, ``results.json``. Runs are grouped by the swept keys other than ``seed``; each group
shows the mean ± 95% CI (Student t) over its finished runs, so over seeds. Runs that failed or
are unfinished are listed as such.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_write_bytes, atomic_write_text

# Two-sided 95% quantiles of Student's t for 1..9 degrees of freedom (scipy.stats.t.ppf(0.975));
# from 10 on, the Cornish-Fisher expansion below is within 1e-5 of them.
T95_SMALL = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)
Z95 = 1.959963984540054

# A line of train.log recording a fatal error: Hydra's log format, or a Python traceback.
ERROR_LINE = re.compile(r"\]\[(?:ERROR|CRITICAL)\] - (.+)$|^(Traceback .+)$", re.MULTILINE)
# The line of a run that a search's pruner stopped (fewshot_cli.train.STOPPED_EARLY).
STOPPED_LINE = re.compile(r"\] - stopped early at step (\d+) of \d+: (.+)$", re.MULTILINE)


@dataclass
class Run:
    """What one run folder says about itself."""

    path: Path
    overrides: dict[str, str]                  # the run's key=value command-line overrides
    status: str = "done"                       # done | unfinished | pruned | failed | resume
    note: str = ""                             # why it is not done
    step: int | None = None                    # steps done: the latest checkpoint's step
    steps: int | None = None                   # steps configured (train.steps)
    best: dict[str, float] | None = None       # best validation {accuracy, ci95, step}
    tests: dict[str, dict[str, float]] = field(default_factory=dict)  # "best.pt": own shape
    episodes_per_s: float | None = None        # median of train/episodes_per_s
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val accuracy)


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof <= len(T95_SMALL):
        return T95_SMALL[dof - 1]
    # Cornish-Fisher expansion of t in powers of 1/dof (Abramowitz & Stegun 26.7.5).
    z = Z95
    terms = ((z**3 + z) / 4,
             (5 * z**5 + 16 * z**3 + 3 * z) / 96,
             (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / dof ** (i + 1) for i, g in enumerate(terms))


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width (Student t) of a few values, e.g. one per seed; nan CI for 1."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return values[0], math.nan
    n = len(values)
    return statistics.fmean(values), t95(n - 1) * statistics.stdev(values) / math.sqrt(n)


def run_status(log: str, step: int | None, steps: int | None) -> tuple[str, str]:
    """``(status, note)`` from a run's train.log text and its latest checkpoint's step.

    done: the checkpoint reached train.steps; failed: train.log records an error; pruned: a
    search's pruner stopped it (its last.pt is at that step); unfinished: otherwise (still
    running, stopped or killed). The one place to read a status file from.
    """
    if step is not None and steps is not None and step >= steps:
        return "done", ""
    error = ERROR_LINE.search(log)
    if error:
        return "failed", (error.group(1) or error.group(2)).strip()
    stopped = list(STOPPED_LINE.finditer(log))
    if stopped and step == int(stopped[-1].group(1)):  # not continued by hand since
        return "pruned", f"at step {step} of {steps} ({stopped[-1].group(2)})"
    if step is None:
        return "unfinished", "no checkpoint (running, or stopped before its first validation)"
    return "unfinished", f"step {step} of {steps}"


def find_runs(root: Path) -> list[Path]:
    """The run folders under ``root`` (``root`` included), Hydra's job numbers in order."""

    def order(path: Path) -> tuple:
        job = re.match(r"(\d+)(?:-|$)", path.name)
        return path.parent.parts, int(job.group(1)) if job else -1, path.name

    return sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")}, key=order)


def read_scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars ``tags`` of a run folder, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # not one line per event file
    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    events.Reload()
    present = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present}


def read_run(path: Path) -> Run:
    """Everything ``fewshot report`` shows about the run folder ``path``."""
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    run = Run(path, dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o))
    config = OmegaConf.load(path / ".hydra" / "config.yaml")
    if config.get("resume"):
        run.status, run.note = "resume", f"continued {config.resume} in that run's folder"
        return run

    run.steps = OmegaConf.select(config, "train.steps")
    ckpt = next((path / name for name in ("last.pt", "best.pt") if (path / name).is_file()), None)
    stored: dict[str, Any] = {}
    if ckpt is not None:
        try:
            state = load_checkpoint(ckpt)
        except FewshotError as err:
            run.status, run.note = "failed", str(err)
            return run
        best = state["best"]  # {"accuracy" (or another metric's "score"), "ci95", "step"}
        run.step, stored = state["step"], state["config"]
        run.best = {**best, "accuracy": best.get("accuracy", best.get("score"))}
        run.steps = stored["train"]["steps"]  # resume may have changed it
    log = path / "train.log"
    run.status, run.note = run_status(log.read_text(errors="replace") if log.is_file() else "",
                                      run.step, run.steps)

    results = path / "results.json"
    if results.is_file() and stored:
        # The run's own test shape (eval.ways/shots, often following the swept train.shots) is
        # one column; other shapes evaluated on purpose get their own.
        own = (stored["eval"].get("ways"), stored["eval"].get("shots"))
        for ckpt_name, entries in json.loads(results.read_text()).items():
            for result in entries.values():
                shape = (result.get("ways"), result.get("shots"))
                label = ckpt_name if shape == own else f"{shape[0]}way-{shape[1]}shot {ckpt_name}"
                metric = result.get("metric", "accuracy")
                run.tests[label] = {"accuracy": result[metric], "ci95": result["ci95"]}
    scalars = read_scalars(path, ("val/accuracy", "train/episodes_per_s"))
    run.curve = scalars.get("val/accuracy", [])
    speeds = [value for _, value in scalars.get("train/episodes_per_s", [])]
    run.episodes_per_s = statistics.median(speeds) if speeds else None
    return run


def swept_keys(runs: list[Run]) -> list[str]:
    """The override keys whose value differs between runs, ``seed`` aside, in command order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    return [key for key in keys
            if key != "seed" and len({run.overrides.get(key) for run in runs}) > 1]


def value_order(value: str | None) -> tuple:
    """Sort numbers as numbers, then strings, then unset."""
    number = as_number(value)
    if number is not None:
        return 0, number, ""
    return (1, 0.0, value) if value is not None else (2, 0.0, "")


def as_number(value: str | None) -> float | None:
    """``value`` as a float when it is a plain number (not a bool), else None."""
    try:
        return float(value) if value not in (None, "true", "false") else None
    except ValueError:
        return None


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Runs grouped by their values of ``keys``, groups in sorted order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(k) for k in keys), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: [value_order(v) for v in kv[0]]))


def percent(mean: float, ci: float) -> str:
    """``mean ± ci`` in percent; only the mean for a single run, a dash for none."""
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f} ± {100 * ci:.2f}" if not math.isnan(ci) else f"{100 * mean:.2f}"


def group_table(groups: dict[tuple, list[Run]], keys: list[str], tests: list[str]) -> str:
    """The Markdown table: one row per group, mean ± 95% CI over the group's finished runs."""
    head = [*(keys or ["runs"]), "finished", "steps", "best val acc (%)",
            *(f"test {t} (%)" for t in tests), "episodes/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for values, members in groups.items():
        done = [r for r in members if r.status == "done"]
        steps = sorted({r.step for r in done})
        speeds = [r.episodes_per_s for r in done if r.episodes_per_s is not None]
        row = [v if v is not None else "(default)" for v in values] if keys else ["all"]
        row += [f"{len(done)} of {len(members)}",
                "—" if not steps else "–".join(map(str, sorted({steps[0], steps[-1]}))),
                percent(*mean_ci95([r.best["accuracy"] for r in done]))]
        row += [percent(*mean_ci95([r.tests[t]["accuracy"] for r in done if t in r.tests]))
                for t in tests]
        row.append(f"{statistics.fmean(speeds):.1f}" if speeds else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(root: Path, runs: list[Run], keys: list[str], tests: list[str]) -> str:
    """The Markdown report: the table, the best run, and every run that is not done."""
    done = [r for r in runs if r.status == "done"]
    trained = [r for r in runs if r.status != "resume"]
    lines = [f"# fewshot report: {root}", "",
             f"{len(done)} of {len(trained)} runs finished; grouped by "
             f"{', '.join(keys) or 'nothing (no key differs between runs)'}; "
             "mean ± 95% CI (Student t) over the finished runs of each row, i.e. over seeds.", "",
             group_table(group_runs(trained, keys), keys, tests), ""]
    if done:
        best = max(done, key=lambda r: r.best["accuracy"])
        swept = " ".join(f"{k}={best.overrides[k]}" for k in [*keys, "seed"]
                         if k in best.overrides)
        lines.append(f"best run: {name(root, best)} ({swept or 'no overrides'}): best val acc "
                     f"{percent(best.best['accuracy'], best.best['ci95'])}% at step "
                     f"{best.best['step']}")
    else:
        lines.append("best run: none has finished yet")
    unfinished = [r for r in trained if r.status != "done"]
    if unfinished:
        lines += ["", f"not finished ({len(unfinished)}):"]
        lines += [f"- {name(root, r)}: {r.status}: {r.note}" for r in unfinished]
    resumes = [r for r in runs if r.status == "resume"]
    if resumes:
        lines += ["", f"resume commands ({len(resumes)}), counted in the runs they continued:"]
        lines += [f"- {name(root, r)}: {r.note}" for r in resumes]
    return "\n".join(lines) + "\n"


def name(root: Path, run: Run) -> str:
    """The run folder relative to the report's folder."""
    return str(run.path.relative_to(root))


def table_csv(root: Path, runs: list[Run], tests: list[str]) -> str:
    """report.csv: one row per run, with every override, accuracies as fractions."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "status", "note", *keys, "step", "steps", "val_accuracy",
                     "val_ci95", "val_best_step", *(f"test {t} {m}" for t in tests
                                                     for m in ("accuracy", "ci95")),
                     "episodes_per_s"])
    for run in runs:
        best = run.best or {}
        writer.writerow([name(root, run), run.status, run.note,
                         *(run.overrides.get(k, "") for k in keys), run.step, run.steps,
                         best.get("accuracy"), best.get("ci95"), best.get("step"),
                         *(run.tests.get(t, {}).get(m) for t in tests
                           for m in ("accuracy", "ci95")),
                         run.episodes_per_s])
    return out.getvalue()


def plot(root: Path, runs: list[Run], keys: list[str], tests: list[str]) -> bytes:
    """report.png: best accuracy against each swept key, and the validation curves."""
    from matplotlib.figure import Figure

    panels = len(keys) + 1
    cols = min(panels, 3)
    fig = Figure(figsize=(4.8 * cols, 3.8 * math.ceil(panels / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(panels / cols), cols, squeeze=False).ravel()
    trained = [r for r in runs if r.status != "resume"]
    done = [r for r in trained if r.status == "done"]
    for ax, key in zip(axes, keys, strict=False):
        plot_key(ax, done, key, tests[:1])
    plot_curves(axes[len(keys)], trained, keys)
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"{root.parent.name}/{root.name}: {len(done)} of {len(trained)} runs finished")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()


def plot_key(ax: Any, runs: list[Run], key: str, tests: list[str]) -> None:
    """Best validation (and first test) accuracy of each run against ``key``'s value."""
    values = [r.overrides.get(key) for r in runs]
    numbers = [as_number(v) for v in values]
    if numbers and all(x is not None for x in numbers):
        xs = numbers
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        elif len(set(xs)) <= 8:  # a grid's few values: tick exactly those
            ticks = dict(sorted(zip(xs, values, strict=True)))
            ax.set_xticks(list(ticks), labels=list(ticks.values()))
    else:
        categories = sorted(set(values), key=value_order)
        xs = [categories.index(v) for v in values]
        ax.set_xticks(range(len(categories)),
                      labels=[c if c is not None else "(default)" for c in categories])
    series = [("best val", [r.best["accuracy"] for r in runs])]
    series += [(f"test {t}", [r.tests.get(t, {}).get("accuracy") for r in runs]) for t in tests]
    # Black and red here, so the curves' group colours (C0, C1, ...) mean one thing only.
    for color, (label, ys) in zip(("black", "C3"), series, strict=False):
        points = [(x, 100 * y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if not points:
            continue
        ax.scatter(*zip(*points, strict=True), s=16, alpha=0.45, color=color)
        at = sorted({x for x, _ in points})
        means, cis = zip(*(mean_ci95([y for x, y in points if x == a]) for a in at), strict=True)
        cis = [0.0 if math.isnan(c) else c for c in cis]
        # Few seeds give wide t intervals: draw them only within the possible 0-100%.
        yerr = [[min(c, m) for m, c in zip(means, cis, strict=True)],
                [min(c, 100 - m) for m, c in zip(means, cis, strict=True)]]
        ax.errorbar(at, means, yerr=yerr, fmt="o-", capsize=4, color=color,
                    label=f"{label} (mean ± 95% CI)")
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy against {key}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_curves(ax: Any, runs: list[Run], keys: list[str]) -> None:
    """Validation accuracy against the step, read back from each run's TensorBoard events."""
    from matplotlib.ticker import MaxNLocator

    groups = list(group_runs(runs, keys))
    labelled: set[int] = set()
    for run in runs:
        if not run.curve:
            continue
        group = groups.index(tuple(run.overrides.get(k) for k in keys))
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, groups[group], strict=True)) or "runs"
        steps, accs = zip(*run.curve, strict=True)
        ax.plot(steps, [100 * a for a in accs], color=f"C{group % 10}",
                linestyle="-" if run.status == "done" else "--", marker="." if len(steps) < 30
                else None, label=None if group in labelled else label)
        labelled.add(group)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("validation curves (dashed: not finished)", fontsize="medium")
    ax.grid(alpha=0.3)
    if 0 < len(labelled) <= 10:
        ax.legend(fontsize="small")


def report(cfg: DictConfig) -> dict[str, Any]:
    """Print the sweep's Markdown table and write report.md, report.csv and report.png."""
    root = Path(cfg.dir).expanduser().resolve()
    if not root.is_dir():
        raise FewshotError(f"dir={cfg.dir} is not a folder; pass a sweep folder such as "
                           "multirun/<date>/<time>, or any folder holding fewshot train runs")
    paths = find_runs(root)
    if not paths:
        raise FewshotError(f"no runs under {root}: a run folder holds .hydra/config.yaml, "
                           "written by fewshot train; pass a multirun/<date>/<time> folder")
    runs = [read_run(path) for path in paths]
    keys = swept_keys([r for r in runs if r.status != "resume"])
    tests = sorted({t for r in runs for t in r.tests})
    out = Path(cfg.out).expanduser().resolve() if cfg.out else root
    text = summary(root, runs, keys, tests)
    print(text)
    atomic_write_text(text, out / "report.md")
    atomic_write_text(table_csv(root, runs, tests), out / "report.csv")
    atomic_write_bytes(plot(root, runs, keys, tests), out / "report.png")
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'} and {out / 'report.png'}")
    return {"runs": runs, "keys": keys, "out": out}
