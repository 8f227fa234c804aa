"""``fewshot report DIR``: summarise a sweep, or any folder of runs: a table, a CSV and a plot.

A run folder is one holding ``.hydra/config.yaml`` (written by ``fewshot train``) with its
``.hydra/overrides.yaml``, ``train.log``, ``last.pt``/``best.pt``, TensorBoard events and, once
evaluated, ``results.json``. Runs are grouped by the swept keys other than ``seed``; each group
shows the mean ± 95% CI (Student t) over its finished runs, so over seeds, with their count
(``n=3``); runs repeating another's full config (seed included) are counted once and named.
Each run's score is read under its own metric (accuracy in %, RL²'s total reward as it is).
A test is keyed by its full protocol (results.py): each run's own protocol is one column per
checkpoint, any other its own column. Runs that failed or are unfinished are listed as such,
and a file of a run that cannot be read is named beside that run while the rest of the folder
is still reported.

report.png: for a sweep of one key, the best validation score and each test protocol (P1, P2 ...
keyed in report.md) against that key, means with their counts; for a search (runs differing
in several keys) no means across settings: a slice per key (each point one run) and Optuna's
parameter importances; and the validation curves. Legends sit outside the axes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_write_bytes, atomic_write_text
from fewshot_cli.intervals import format_mean_ci, scale, student_t_ci95
from fewshot_cli.results import entry_protocol, protocol, read_results

# A line of train.log recording a fatal error: Hydra's log format, or a Python traceback.
ERROR_LINE = re.compile(r"\]\[(?:ERROR|CRITICAL)\] - (.+)$|^(Traceback .+)$", re.MULTILINE)
# The line of a run that a search's pruner stopped (fewshot_cli.train.STOPPED_EARLY).
STOPPED_LINE = re.compile(r"\] - stopped early at step (\d+) of \d+: (.+)$", re.MULTILINE)


@dataclass(eq=False)
class Run:
    """What one run folder says about itself."""

    path: Path
    overrides: dict[str, str]                  # the run's key=value command-line overrides
    status: str = "done"              # done | unfinished | pruned | failed | resume | unreadable
    note: str = ""                             # why it is not done
    step: int | None = None                    # steps done: the latest checkpoint's step
    steps: int | None = None                   # steps configured (train.steps)
    metric: str = "accuracy"                   # what its scores measure (algo.score_name)
    best: dict[str, float] | None = None       # best validation {score, ci95, step}
    tests: dict[Column, dict[str, float | None]] = field(default_factory=dict)  # {score, ci95}
    episodes_per_s: float | None = None        # median of train/episodes_per_s
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/<metric>)
    config: str = ""                           # its full config, canonical: repeats share it
    repeat_of: Run | None = None               # the earlier run with the very same config
    problems: list[str] = field(default_factory=list)  # files that could not be read
    log_keys: set[str] = field(default_factory=set)  # keys its search samples on a log scale


@dataclass(frozen=True)
class Column:
    """A test column: a checkpoint under each run's own protocol (``own``), or under one
    other protocol, which ``key`` holds as canonical JSON; ``short`` names that protocol in
    the figure (``P1``), report.md keys it."""

    own: bool
    ckpt: str
    key: str = ""
    words: str = ""
    short: str = field(default="", compare=False)

    def label(self) -> str:
        return self.ckpt if self.own else f"{self.ckpt} {self.words}"

    def short_label(self) -> str:
        """The column in the figure: ``best.pt``, or ``best.pt P1``."""
        return self.ckpt if self.own else f"{self.ckpt} {self.short}"


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
    """Everything ``fewshot report`` shows about the run folder ``path``; a file of the run
    that cannot be read becomes a note (a problem, or the run's status), never an error."""
    hydra = path / ".hydra"
    try:
        config = OmegaConf.load(hydra / "config.yaml")
        listed = OmegaConf.load(hydra / "overrides.yaml") \
            if (hydra / "overrides.yaml").is_file() else []
        if not isinstance(config, DictConfig) or "train" not in config or \
                not isinstance(listed, (ListConfig, list)):
            raise ValueError("config.yaml is not a fewshot train config or overrides.yaml "
                             "not a list")
        overrides = [str(o) for o in listed]
    except Exception as err:  # noqa: BLE001 - OmegaConf and YAML raise many kinds
        run = Run(path, {}, status="unreadable")
        run.note = f"its .hydra files cannot be read ({str(err).splitlines()[0][:100]})"
        run.problems.append(run.note)
        return run
    run = Run(path, dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o),
              log_keys=searched_on_log_scale(hydra / "hydra.yaml"))
    run.config = json.dumps(OmegaConf.to_container(config), sort_keys=True, default=str)
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
        best = state["best"]  # {"accuracy" or "score", "ci95", "step", "metric"}
        run.step, stored = state["step"], state["config"]
        run.metric = best.get("metric", "accuracy")
        run.best = {"score": best.get("score", best.get("accuracy")), "ci95": best["ci95"],
                    "step": best["step"]}
        run.steps = stored["train"]["steps"]  # resume may have changed it
    log = path / "train.log"
    run.status, run.note = run_status(log.read_text(errors="replace") if log.is_file() else "",
                                      run.step, run.steps)
    if stored and (path / "results.json").is_file():
        read_tests(run, stored)
    read_curves(run)
    return run


def searched_on_log_scale(path: Path) -> set[str]:
    """The keys that the search of the run whose Hydra config is ``path`` (.hydra/hydra.yaml)
    samples on a log scale: ``tag(log, interval(...))`` in its ``hydra.sweeper.params``."""
    try:
        params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params") \
            if path.is_file() else None
        params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else {}
    except Exception:  # noqa: BLE001 - not this file's reader's business: linear axes then
        return set()
    return {str(k) for k, v in params.items() if re.match(r"\s*tag\(\s*log\s*,", str(v))}


def read_tests(run: Run, stored: dict[str, Any]) -> None:
    """``run.tests`` from its results.json: the entries under the run's own protocol (its
    stored ``eval.*`` settings and the model's own query statistics, what ``fewshot eval``
    uses by default) go in one column per checkpoint, others in a column of their protocol."""
    path = run.path / "results.json"
    try:
        results = read_results(path)
    except FewshotError as err:
        run.problems.append(f"{err}; its test results are left out (fewshot eval moves such a "
                            "file aside and starts a fresh one)")
        return
    entries = [(ckpt, key, entry) for ckpt, found in results.items()
               for key, entry in found.items()]
    model = next((e["model_query_statistics"] for *_, e in entries
                  if e.get("model_query_statistics")), None)
    own = protocol(stored, model, run.path)
    for ckpt, key, entry in entries:
        record = entry_protocol(entry, own)
        if record == own:
            column = Column(True, ckpt)
        else:
            words = key if not record["query_statistics"] or "query statistics" in key else \
                f"{key}, {record['query_statistics']} query statistics"
            column = Column(False, ckpt, json.dumps(record, sort_keys=True, default=str), words)
        run.tests[column] = {"score": entry[entry.get("metric", "accuracy")],
                             "ci95": entry.get("ci95")}


def read_curves(run: Run) -> None:
    """``run.curve`` (``val/<metric>``) and its median training speed from its TensorBoard
    events; events that cannot be read become a problem of the run."""
    tag = f"val/{run.metric}"
    try:
        scalars = read_scalars(run.path, (tag, "train/episodes_per_s"))
    except Exception as err:  # noqa: BLE001 - TensorBoard's reader raises many kinds
        run.problems.append(f"its TensorBoard events cannot be read ({err}); no curve")
        return
    run.curve = scalars.get(tag, [])
    speeds = [value for _, value in scalars.get("train/episodes_per_s", [])]
    run.episodes_per_s = statistics.median(speeds) if speeds else None


def mark_repeats(runs: list[Run]) -> None:
    """Set ``repeat_of`` on each finished run whose full config (seed included) is that of an
    earlier finished run: the same experiment twice (e.g. two Optuna trials drawing the same
    parameters) is one sample, not two seeds."""
    first: dict[str, Run] = {}
    for run in runs:
        if run.status != "done" or not run.config:
            continue
        if run.config in first:
            run.repeat_of = first[run.config]
        else:
            first[run.config] = run


def tabled(runs: list[Run]) -> list[Run]:
    """The runs the table and plots show: not resume commands (counted in the runs they
    continued), nor folders whose config cannot be read (listed with their problem)."""
    return [r for r in runs if r.status not in ("resume", "unreadable")]


def counted(runs: list[Run]) -> list[Run]:
    """The finished runs that count: one per distinct config."""
    return [r for r in runs if r.status == "done" and r.repeat_of is None]


def samples(runs: list[Run], value: Callable[[Run], float | None]) -> list[float]:
    """One value per distinct config among the finished ``runs``: the mean of ``value`` over
    that config's runs that have one (repeats of one experiment are one sample)."""
    by_config: dict[int, list[float]] = {}
    for run in runs:
        found = value(run) if run.status == "done" else None
        if found is not None:
            by_config.setdefault(id(run.repeat_of or run), []).append(found)
    return [statistics.fmean(values) for values in by_config.values()]


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


def heading(metric: str | None, what: str, label: str = "") -> str:
    """A column heading naming the metric and its unit: ``best val accuracy (%)``, ``test
    total_reward best.pt``; metric None: the runs' metrics differ and each cell has its unit."""
    words = " ".join(w for w in (what, metric, label) if w)
    return f"{words} (%)" if metric == "accuracy" else words


def only_metric(runs: list[Run]) -> str | None:
    """The metric every run is scored by, or None when they differ."""
    metrics = {r.metric for r in runs}
    return metrics.pop() if len(metrics) == 1 else None


def group_table(groups: dict[tuple, list[Run]], keys: list[str], tests: list[Column],
                metric: str | None) -> str:
    """The Markdown table: one row per group, mean ± 95% CI over the group's finished runs
    (one per distinct config); ``metric`` None: the runs' metrics differ."""
    head = [*(keys or ["runs"]), "finished", "steps", heading(metric, "best val"),
            *(heading(metric, "test", t.short_label()) for t in tests), "episodes/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for values, members in groups.items():
        done = counted(members)
        repeats = sum(r.repeat_of is not None for r in members)
        steps = sorted({r.step for r in done})
        speeds = [r.episodes_per_s for r in done if r.episodes_per_s is not None]
        group_metric = members[0].metric  # one per group (group_runs_by_metric)
        cell = partial(group_cell, metric=group_metric, unit=metric is None)
        row = [v if v is not None else "(default)" for v in values] if keys else ["all"]
        row += [f"{len(done)} of {len(members) - repeats}"
                + (f" (+{repeats} repeated)" if repeats else ""),
                "—" if not steps else "–".join(map(str, sorted({steps[0], steps[-1]}))),
                cell(samples(members, lambda r: r.best["score"]))]
        row += [cell(samples(members, lambda r, t=t: r.tests.get(t, {}).get("score")))
                for t in tests]
        row.append(f"{statistics.fmean(speeds):.1f}" if speeds else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def group_cell(values: list[float], metric: str, unit: bool) -> str:
    """A table cell: the mean ± 95% CI of ``values``, one per counted run, and their count
    (``n=2``): a test of 1 of 3 runs says so."""
    if not values:
        return "—"
    return f"{format_mean_ci(*student_t_ci95(values), metric, unit=unit)} (n={len(values)})"


def group_runs_by_metric(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Runs grouped by ``keys`` and, where the runs' metrics differ, by metric too: scores of
    different metrics are never averaged together."""
    if only_metric(runs) is not None:
        return group_runs(runs, keys)
    groups: dict[tuple, list[Run]] = {}
    for values, members in group_runs(runs, keys).items():
        for run in members:
            groups.setdefault((*values, run.metric), []).append(run)
    return groups


def summary(root: Path, runs: list[Run], keys: list[str], tests: list[Column]) -> str:
    """The Markdown report: the table, the best run, and every run that is not done, repeats
    another or has a file that could not be read."""
    trained = tabled(runs)
    done, metric = counted(trained), only_metric(trained)
    shown_keys = keys if metric is not None else [*keys, "metric"]
    lines = [f"# fewshot report: {root}", "",
             f"{len(done)} of {len(trained)} runs finished; grouped by "
             f"{', '.join(keys) or 'nothing (no key differs between runs)'}; "
             "mean ± 95% CI (Student t) over the finished runs of each row, i.e. over seeds, "
             "n the runs it covers; "
             "a test column named by a checkpoint alone holds each run's own test protocol "
             "(its eval settings), any other protocol has its own column.", "",
             group_table(group_runs_by_metric(trained, keys), shown_keys, tests, metric), ""]
    lines += protocol_key(tests)
    if len(keys) > 1:
        lines += ["report.png: the runs differ in several settings, so its panels average "
                  "nothing across them: each point of a slice is one run, beside Optuna's "
                  "parameter importances where Optuna is installed (the cluster extra).", ""]
    lines += best_runs(root, done, keys)
    lines += study_best(root)
    repeats = [r for r in trained if r.repeat_of is not None]
    if repeats:
        lines += ["", f"repeated runs ({len(repeats)}), the same full config seed included, "
                      "counted once:"]
        lines += [f"- {name(root, r)} repeats {name(root, r.repeat_of)}" for r in repeats]
    unfinished = [r for r in trained if r.status != "done"]
    if unfinished:
        lines += ["", f"not finished ({len(unfinished)}):"]
        lines += [f"- {name(root, r)}: {r.status}: {r.note}" for r in unfinished]
    troubled = [r for r in runs if r.problems]
    if troubled:
        lines += ["", "files that could not be read, by run:"]
        lines += [f"- {name(root, r)}: {problem}" for r in troubled for problem in r.problems]
    resumes = [r for r in runs if r.status == "resume"]
    if resumes:
        lines += ["", f"resume commands ({len(resumes)}), counted in the runs they continued:"]
        lines += [f"- {name(root, r)}: {r.note}" for r in resumes]
    return "\n".join(lines) + "\n"


def protocol_key(tests: list[Column]) -> list[str]:
    """The lines of report.md naming the test protocols that its table and report.png call
    P1, P2 ... (report.csv's columns name them in full)."""
    named = {c.short: c.words for c in tests if not c.own}
    if not named:
        return []
    return ["test protocols, as the table and report.png name them (a checkpoint alone: each "
            "run's own):",
            *(f"- {short}: {words}" for short, words in named.items()), ""]


def best_runs(root: Path, done: list[Run], keys: list[str]) -> list[str]:
    """One line naming the run with the best validation score (one per metric)."""
    if not done:
        return ["best run: none has finished yet"]
    lines = []
    for metric in sorted({r.metric for r in done}):
        best = max((r for r in done if r.metric == metric), key=lambda r: r.best["score"])
        swept = " ".join(f"{k}={best.overrides[k]}" for k in [*keys, "seed"]
                         if k in best.overrides)
        lines.append(f"best run: {name(root, best)} ({swept or 'no overrides'}): best val "
                     f"{metric} {format_mean_ci(best.best['score'], best.best['ci95'], metric)} "
                     f"at step {best.best['step']}")
    return lines


def study_best(root: Path) -> list[str]:
    """For a search's sweep folder (``optimization_results.yaml``): the study's best trial,
    and where it lies when that is another sweep folder (a study continued over several)."""
    from omegaconf import OmegaConf

    try:
        found = OmegaConf.to_container(OmegaConf.load(root / "optimization_results.yaml"))
    except Exception:  # no search here, or a file that is not the sweeper's
        return []
    if not isinstance(found, dict) or found.get("best_trial") is None:
        return []
    where = Path(str(found.get("best_run_dir")))
    inside = where.is_relative_to(root)
    place = f"run {where.relative_to(root)}" if inside else (
        f"another sweep folder: {where}; this folder's runs are the study's later trials")
    return [f"Optuna study {found.get('study_name')}: best trial {found['best_trial']} "
            f"(value {found.get('best_value')}) is {place}"]


def name(root: Path, run: Run) -> str:
    """The run folder relative to the report's folder."""
    return str(run.path.relative_to(root))


def flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested protocol record as ``{"dataset_options.image_size": 28, ...}``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_columns(runs: list[Run]) -> list[Column]:
    """Every test column of the runs, the own-protocol ones first, then by label. Protocols
    that differ only where the words do not look (a data set option) get the differing
    values added to their label, so no two columns read the same."""
    columns = {t for r in runs for t in r.tests}
    by_label: dict[str, list[Column]] = {}
    for column in columns:
        by_label.setdefault(column.label(), []).append(column)
    renamed: dict[Column, Column] = {}
    for alike in (group for group in by_label.values() if len(group) > 1):
        records = [flat(json.loads(c.key)) for c in alike]
        every = dict.fromkeys(k for r in records for k in r)
        differ = [k for k in every if len({repr(r.get(k)) for r in records}) > 1]
        for column, record in zip(alike, records, strict=True):
            extra = ", ".join(f"{k}={json.dumps(record.get(k))}" for k in differ)
            renamed[column] = replace(column, words=f"{column.words} [{extra}]")
    ordered = sorted({renamed.get(c, c) for c in columns},
                     key=lambda t: (not t.own, t.words, t.key, t.ckpt))
    shorts = {key: f"P{i}" for i, key in
              enumerate(dict.fromkeys(c.key for c in ordered if not c.own), 1)}
    named = {c: replace(c, short=shorts.get(c.key, "")) for c in ordered}
    for run in runs:
        run.tests = {named[renamed.get(t, t)]: score for t, score in run.tests.items()}
    return sorted(named.values(), key=lambda t: (not t.own, t.ckpt, t.words, t.key))


def table_csv(root: Path, runs: list[Run], tests: list[Column]) -> str:
    """report.csv: one row per run, with every override; scores as the metric gives them
    (accuracies as fractions)."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "status", "note", *keys, "step", "steps", "metric", "val_score",
                     "val_ci95", "val_best_step",
                     *(f"test {t.label()} {m}" for t in tests for m in ("score", "ci95")),
                     "episodes_per_s", "repeat_of", "problems"])
    for run in runs:
        best = run.best or {}
        writer.writerow([name(root, run), run.status, run.note,
                         *(run.overrides.get(k, "") for k in keys), run.step, run.steps,
                         run.metric, best.get("score"), best.get("ci95"), best.get("step"),
                         *(run.tests.get(t, {}).get(m) for t in tests for m in ("score", "ci95")),
                         run.episodes_per_s,
                         name(root, run.repeat_of) if run.repeat_of else "",
                         "; ".join(run.problems)])
    return out.getvalue()


RUN_COLOURS = "viridis"  # a search's runs, by number: its slices' points and its curves
# Colours of the series of a panel: black and red, so the curves' group colours (C0, C1, ...)
# mean one thing only.
SERIES_COLOURS = ("black", "C3", "C7", "C5", "C8", "C6")


def figure(root: Path, runs: list[Run], keys: list[str], tests: list[Column]) -> Any:
    """report.png's matplotlib Figure (see the module's docstring): the runs scored by the most
    common metric, where they differ."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trained = tabled(runs)
    metrics = [r.metric for r in trained]
    metric = max(set(metrics), key=metrics.count) if metrics else "accuracy"
    trained = [r for r in trained if r.metric == metric]
    done = counted(trained)
    panels: list[Callable[[Any], None]] = []
    if len(keys) > 1:  # a search: nothing averaged over runs that differ in other settings
        panels += [partial(plot_slice, runs=done, key=key, metric=metric) for key in keys]
        panels.append(partial(plot_importances, importances=param_importances(done, keys),
                              count=len(done), metric=metric))
    elif keys:
        best = [("best val", lambda r: r.best["score"])]
        panels.append(partial(plot_key, runs=done, key=keys[0], series=best, metric=metric,
                              what="best val"))
        for short, columns in protocols(tests).items():
            series = [(c.ckpt, lambda r, c=c: r.tests.get(c, {}).get("score")) for c in columns]
            what = f"test ({short})" if short else "test (own protocol)"
            panels.append(partial(plot_key, runs=done, key=keys[0], series=series,
                                  metric=metric, what=what))
    panels.append(partial(plot_curves, runs=trained, keys=keys, metric=metric))
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.6 * cols, 3.9 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # drawn without pyplot's global state
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, draw in zip(axes, panels, strict=False):
        draw(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    named = sorted({c.short for c in tests if not c.own}, key=lambda s: int(s[1:]))
    fig.suptitle(f"{root.parent.name}/{root.name}: {len(done)} of {len(trained)} runs finished"
                 + (f"; test protocols {', '.join(named)}: see report.md" if named and
                    len(keys) == 1 else ""))
    return fig


def plot(root: Path, runs: list[Run], keys: list[str], tests: list[Column]) -> bytes:
    """report.png's bytes: :func:`figure` at 110 dpi."""
    png = io.BytesIO()
    figure(root, runs, keys, tests).savefig(png, format="png", dpi=110)
    return png.getvalue()


def protocols(tests: list[Column]) -> dict[str, list[Column]]:
    """The test columns by protocol: each run's own first (under ""), then P1, P2 ..."""
    by_protocol: dict[str, list[Column]] = {}
    for column in sorted(tests, key=lambda c: (not c.own, int(c.short[1:] or 0), c.ckpt)):
        by_protocol.setdefault(column.short, []).append(column)
    return by_protocol


def short_number(x: float) -> str:
    """A tick label: 3 significant digits, in at most 6 characters (``0.003``, ``7e-4``,
    ``1.5e-5``)."""
    text = f"{x:.3g}"
    if len(text) <= 6 and "e" not in text:
        return text
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def shown(value: str | None) -> str:
    """A key's value in a legend: as typed, or rounded (:func:`short_number`) when long."""
    number = as_number(value)
    return short_number(number) if number is not None and len(str(value)) > 8 else str(value)


def key_axis(ax: Any, runs: list[Run], key: str) -> list[float]:
    """Set ``ax``'s x axis for ``key``'s values in ``runs`` and return each run's position:
    numbers on a log scale where the search samples them so (or they span 20x and more),
    ticks rounded to 3 significant digits; other values as categories. The axis spans every
    value, so that panels of one key, whichever runs have their score, read alike."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    values = [r.overrides.get(key) for r in runs]
    numbers = [as_number(v) for v in values]
    if not numbers or any(x is None for x in numbers):
        categories = sorted(set(values), key=value_order)
        ax.set_xticks(range(len(categories)),
                      labels=[c if c is not None else "(default)" for c in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)
        return [categories.index(v) for v in values]
    distinct = sorted(set(numbers))
    logged = distinct[0] > 0 and (any(key in r.log_keys for r in runs)
                                  or distinct[-1] / distinct[0] >= 20)
    if logged:
        ax.set_xscale("log")
        decades = math.log10(distinct[-1] / distinct[0])
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 0.7 else (1.0, 2.0, 5.0) \
            if decades < 1.5 else (1.0, 3.0) if decades < 3 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(subs=subs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    typed = {v for v in values if v is not None}
    if len(distinct) <= 6 and all(len(v) <= 6 for v in typed):  # a grid's few values as typed
        ax.set_xticks(distinct, labels=[short_number(x) for x in distinct])
    else:
        if not logged:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_number(x)))
    if logged:
        pad = (distinct[-1] / distinct[0]) ** 0.15 if distinct[-1] > distinct[0] else 2.0
        ax.set_xlim(distinct[0] / pad, distinct[-1] * pad)
    else:
        pad = 0.15 * (distinct[-1] - distinct[0]) or 0.5 * (abs(distinct[0]) or 1.0)
        ax.set_xlim(distinct[0] - pad, distinct[-1] + pad)
    return numbers


def plot_key(ax: Any, runs: list[Run], key: str,
             series: list[tuple[str, Callable[[Run], float | None]]], metric: str,
             what: str) -> None:
    """A score of each run against ``key``'s value (the runs differ in nothing else but the
    seed): every run a faint dot, and per value the mean ± 95% CI with its count, ``n=3``;
    one series per entry of ``series`` (a label and the score of a run, or None)."""
    xs = key_axis(ax, runs, key)
    factor = scale(metric)[0]
    for color, (label, value) in zip(SERIES_COLOURS, series, strict=False):
        points = [(x, factor * y) for x, run in zip(xs, runs, strict=True)
                  if (y := value(run)) is not None]
        if not points:
            continue
        ax.scatter(*zip(*points, strict=True), s=16, alpha=0.45, color=color)
        at = sorted({x for x, _ in points})
        groups = [[y for x, y in points if x == a] for a in at]
        means, cis = zip(*(student_t_ci95(ys) for ys in groups), strict=True)
        cis = [0.0 if math.isnan(c) else c for c in cis]
        # Few seeds give wide t intervals: draw an accuracy's only within the possible 0-100%.
        low, high = (0.0, 100.0) if metric == "accuracy" else (-math.inf, math.inf)
        yerr = [[min(c, m - low) for m, c in zip(means, cis, strict=True)],
                [min(c, high - m) for m, c in zip(means, cis, strict=True)]]
        ax.errorbar(at, means, yerr=yerr, fmt="o-", capsize=4, color=color,
                    label=f"{label}: mean ± 95% CI")
        for a, m, ys in zip(at, means, groups, strict=True):
            ax.annotate(f"n={len(ys)}", (a, m), xytext=(5, 4), textcoords="offset points",
                        fontsize="x-small", color=color)
    ax.set_xlabel(key)
    ax.set_ylabel(heading(metric, ""))
    ax.set_title(f"{what} against {key}", fontsize="medium")
    ax.grid(alpha=0.3)
    outside_legend(ax, "over seeds")


def outside_legend(ax: Any, title: str | None = None) -> None:
    """The legend of ``ax`` to the right of its axes, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize="small", title=title, title_fontsize="small", frameon=False)


def plot_slice(ax: Any, runs: list[Run], key: str, metric: str) -> None:
    """Best validation score of each run against ``key``'s value, as Optuna's slice plot: one
    point per run, no means or lines (the runs differ in other settings too)."""
    from matplotlib.ticker import MaxNLocator

    xs = key_axis(ax, runs, key)
    factor = scale(metric)[0]
    dots = ax.scatter(xs, [factor * r.best["score"] for r in runs], c=run_numbers(runs),
                      cmap=RUN_COLOURS, s=22, edgecolors="black", linewidths=0.3)
    if len(runs) > 1:
        bar = ax.figure.colorbar(dots, ax=ax, pad=0.02, aspect=30)
        bar.set_label("run (Hydra's job number)", fontsize="small")
        bar.ax.tick_params(labelsize="x-small")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(key)
    ax.set_ylabel(heading(metric, "best val"))
    ax.set_title(f"slice: best val against {key} (n={len(runs)})", fontsize="medium")
    ax.grid(alpha=0.3)


def run_numbers(runs: list[Run]) -> list[int]:
    """Each run's Hydra job number (its folder's leading number; else its place in ``runs``):
    a search's trial number, the colour of its point and curve."""
    numbers = []
    for i, run in enumerate(runs):
        job = re.match(r"\d+", run.path.name)
        numbers.append(int(job.group()) if job else i)
    return numbers


def param_importances(runs: list[Run], keys: list[str]) -> dict[str, float] | str:
    """Optuna's fANOVA importance of each key for the runs' best validation score (fractions
    summing to 1), over the finished runs that set every key; or why there are none (no
    Optuna: the cluster extra; fewer than 3 such runs; scores that do not vary)."""
    try:
        import optuna
    except ImportError:
        return "parameter importance needs Optuna:\npip install 'fewshot[cluster]'"
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    runs = [r for r in runs if all(r.overrides.get(k) is not None for k in keys)]
    if len(runs) < 3:
        return f"parameter importance needs 3 finished\nruns setting every key; {len(runs)} do"
    distributions: dict[str, Any] = {}
    for key in keys:
        numbers = [as_number(r.overrides[key]) for r in runs]
        if all(x is not None for x in numbers):
            log = min(numbers) > 0 and any(key in r.log_keys for r in runs)
            distributions[key] = FloatDistribution(min(numbers), max(numbers), log=log)
        else:
            distributions[key] = CategoricalDistribution(sorted({r.overrides[key] for r in runs}))
    trials = [optuna.trial.create_trial(
        params={k: (r.overrides[k] if isinstance(d, CategoricalDistribution)
                    else float(r.overrides[k])) for k, d in distributions.items()},
        distributions=distributions, value=r.best["score"]) for r in runs]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(direction="maximize")
            study.add_trials(trials)
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as err:  # e.g. every run scored the same
        return f"Optuna found no importances:\n{str(err).splitlines()[0][:60]}"
    finally:
        optuna.logging.set_verbosity(verbosity)


def plot_importances(ax: Any, importances: dict[str, float] | str, count: int,
                     metric: str) -> None:
    """Horizontal bars of :func:`param_importances`, the most important on top; or why there
    are none, written in the panel."""
    ax.set_title(f"parameter importance (Optuna fANOVA, n={count})", fontsize="medium")
    if isinstance(importances, str):
        ax.text(0.5, 0.5, importances, ha="center", va="center", fontsize="small",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    keys = list(importances)[::-1]
    ax.barh(range(len(keys)), [importances[k] for k in keys], color="C0")
    ax.set_yticks(range(len(keys)), labels=keys)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of the variance of best val {metric}")
    ax.grid(alpha=0.3, axis="x")


def plot_curves(ax: Any, runs: list[Run], keys: list[str], metric: str) -> None:
    """Validation score against the step, read back from each run's TensorBoard events. Over
    one swept key, a colour per group, named with its number of runs in a legend (to the right,
    at most 10 groups); over several (a search), each run coloured by its number as in the
    slices, without a legend."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    groups = group_runs(runs, keys)
    order = list(groups)
    numbers = run_numbers(runs)
    colours = colormaps[RUN_COLOURS]
    labelled: set[int] = set()
    factor = scale(metric)[0]
    for run, number in zip(runs, numbers, strict=True):
        if not run.curve:
            continue
        values = tuple(run.overrides.get(k) for k in keys)
        group = order.index(values)
        label = ", ".join(f"{k}={shown(v)}" for k, v in zip(keys, values, strict=True)) \
            or "runs"
        steps, scores = zip(*run.curve, strict=True)
        colour = f"C{group % 10}" if len(keys) <= 1 else \
            colours((number - min(numbers)) / max(1, max(numbers) - min(numbers)))
        ax.plot(steps, [factor * a for a in scores], color=colour,
                linestyle="-" if run.status == "done" else "--", marker="." if len(steps) < 30
                else None, label=None if group in labelled or len(keys) > 1
                else f"{label} (n={len(groups[values])})")
        labelled.add(group)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("meta-training step")
    ax.set_ylabel(heading(metric, "validation"))
    ax.set_title("validation curves (dashed: not finished)" if len(keys) <= 1 else
                 "validation curves (colour: run number)", fontsize="medium")
    ax.grid(alpha=0.3)
    if 0 < len(labelled) <= 10:
        outside_legend(ax)


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
    mark_repeats(runs)
    keys = swept_keys(tabled(runs))
    tests = result_columns(runs)
    out = Path(cfg.out).expanduser().resolve() if cfg.out else root
    text = summary(root, runs, keys, tests)
    print(text)
    atomic_write_text(text, out / "report.md")
    atomic_write_text(table_csv(root, runs, tests), out / "report.csv")
    atomic_write_bytes(plot(root, runs, keys, tests), out / "report.png")
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'} and {out / 'report.png'}")
    return {"runs": runs, "keys": keys, "tests": tests, "out": out}
