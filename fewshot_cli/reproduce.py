"""``fewshot reproduce experiment=NAME [key=value ...]``: meta-train a paper preset (or continue
it with ``resume=<run>/last.pt``; a finished run is only evaluated), test its best checkpoint at
every shape the paper reports, and set the paper's figures against ours with a verdict.

``seeds=[0,1,2]`` trains one run per seed in ``<run folder>/seed<N>`` (or continues the ones
there: the same command with the same ``hydra.run.dir`` picks up where it stopped), records
each, and sets the paper against the mean and Student-t 95% interval over the seeds, beside each
run's interval over its test episodes (as MAML++ and later papers report). Runs of different
presets, overrides, test protocols or steps are refused, never combined.

A preset's ``paper`` block (``conf/experiment/base/*.yaml``) holds the figures, per test shape
(``5w1s``; ``k5_n10`` for bandits), and the preset's ``paper.shapes`` the shapes its model is
tested at. The run's folder gets ``reproduction.json`` (format: ``reproductions/README.md``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fewshot_cli.config import conf_dir
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_write_text
from fewshot_cli.intervals import format_mean_ci, student_t_ci95

log = logging.getLogger(__name__)
SHAPE = re.compile(r"(\d+)w(\d+)s")  # "20w1s": 20-way 1-shot; other shapes keep the stored eval
RECORD = "reproduction.json"


def reproduce(cfg: DictConfig, train_new: Callable[[DictConfig, Path], Any],
              resume_run: Callable[[list[str]], Any]) -> dict[str, Any]:
    """Train (``train_new(cfg, run_dir)``: the train command's task) or continue
    (``resume_run``: the train command's ``resume=`` path) the preset of ``cfg``, then evaluate
    and record it; with ``seeds=`` one run per seed, and the record over them.

    Returns the record written to ``<run>/reproduction.json``. Raises FewshotError when no paper
    preset is given, when ``resume=`` names a run of another preset or one trained without
    a preset, when ``seeds=`` is not a list of distinct seeds or its runs cannot be combined,
    and for every error of training and evaluation.
    """
    from fewshot_cli.engine.run_folder import discard_if_empty

    hydra_cfg = HydraConfig.get()
    out, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise FewshotError("fewshot reproduce runs one preset at a time; run it once per preset "
                           "instead of with -m")
    if cfg.get("seeds") is not None:
        try:
            seeds = _seed_list(cfg)
            _require_preset(cfg)
        except FewshotError:
            discard_if_empty(out)
            raise
        return _reproduce_seeds(cfg, out, overrides, seeds, train_new, resume_run)
    if cfg.get("resume"):
        discard_if_empty(out)  # the folder Hydra claimed: the run continues in its own
        run_dir = _continue(Path(str(cfg.resume)), overrides, resume_run)
    else:
        try:
            _require_preset(cfg)
        except FewshotError:
            discard_if_empty(out)
            raise
        train_new(cfg, out)
        run_dir = out
    return evaluate_and_record(run_dir, cfg, overrides)


# ---------------------------------------------------------------- several seeds


def _seed_list(cfg: DictConfig) -> list[int]:
    """``seeds=`` as distinct whole numbers, in the order given (FewshotError otherwise, and
    with ``resume=``, which continues one run)."""
    seeds = cfg.get("seeds")
    if cfg.get("resume"):
        raise FewshotError("seeds= and resume= do not go together: to continue a reproduction "
                           "over seeds, run the command that started it again with its "
                           "hydra.run.dir")
    values = list(seeds) if isinstance(seeds, Sequence) and not isinstance(seeds, str) else []
    if not values or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                             for s in values) or len(set(values)) != len(values):
        raise FewshotError(f"seeds={seeds} must be a list of distinct whole numbers, e.g. "
                           "seeds=[0,1,2]")
    return values


def _reproduce_seeds(cfg: DictConfig, out: Path, overrides: list[str], seeds: list[int],
                     train_new: Callable[[DictConfig, Path], Any],
                     resume_run: Callable[[list[str]], Any]) -> dict[str, Any]:
    """Train or continue ``out/seed<N>`` for each seed, record each run, then write the record
    over the seeds to ``out/reproduction.json`` and print it."""
    from fewshot_cli.cli import RESUMABLE, quoted
    from fewshot_cli.shell import arg, command

    started = [seed for seed in seeds if (out / f"seed{seed}" / "last.pt").exists()]
    for seed in started:  # every refusal before anything trains
        _same_settings(out / f"seed{seed}", overrides, seed)
    records = []
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        if seed in started:
            resume_run([f"resume={quoted(str(run_dir / 'last.pt'))}",
                        *(o for o in overrides if _key(o) in RESUMABLE)])
        else:
            seeded = cfg.copy()
            seeded.seed = seed
            train_new(seeded, run_dir)
        records.append({"seed": seed, **evaluate_and_record(run_dir, cfg, overrides)})
    record = over_seeds(records, out, overrides)
    path = out / RECORD
    atomic_write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", path)
    print(table(record))
    print(f"reproduction over {len(seeds)} seeds written to {path}; to continue it or add "
          f"seeds: {command('reproduce', *map(shlex.quote, overrides), arg('hydra.run.dir', out))}")
    return record


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _same_settings(run_dir: Path, overrides: list[str], seed: int) -> None:
    """Refuse to continue the seed run ``run_dir`` with settings other than those that started
    it (beyond the keys resume= may change and the list of seeds), or one trained with a seed
    other than its folder's."""
    from fewshot_cli.cli import RESUMABLE

    config = run_dir / ".hydra" / "config.yaml"
    trained = OmegaConf.load(config).get("seed") if config.is_file() else seed
    if trained != seed:
        raise FewshotError(f"{run_dir} holds a run trained with seed={trained}, not {seed}; "
                           f"move it to seed{trained}/ or give this reproduction its own "
                           "hydra.run.dir")
    started = run_dir / ".hydra" / "overrides.yaml"
    first = [str(o) for o in OmegaConf.load(started)] if started.is_file() else []
    fixed = [o for o in first if _key(o) not in {*RESUMABLE, "seeds"}]
    asked = [o for o in overrides if _key(o) not in {*RESUMABLE, "seeds"}]
    if sorted(fixed) != sorted(asked):
        raise FewshotError(f"{run_dir} was started with {' '.join(fixed) or 'no overrides'}, "
                           f"not {' '.join(asked) or 'no overrides'}; run the command that "
                           "started it (only the keys resume= may change can differ), or give "
                           "the new settings their own hydra.run.dir")


# What runs combined over seeds must share, and what the refusal calls it.
SHARED = (("preset", "presets"), ("steps", "steps (done and planned)"),
          ("changed", "overrides"), ("protocol_from_preset", "test protocols"))


def over_seeds(records: Sequence[Mapping[str, Any]], out: Path, overrides: list[str]
               ) -> dict[str, Any]:
    """The record over several runs of one preset (``records``, each with its ``seed``): per
    test shape the mean and Student-t 95% half-width over the runs' means (``ours``, with each
    run's own figure and episode interval under ``runs``), judged against the paper.

    Raises FewshotError (one sentence) when two runs differ in preset, steps, overrides or test
    protocol (test shapes, episodes, queries, test seed): their figures are not one
    configuration's."""
    from fewshot_cli.engine.checkpoint import code_version

    first = records[0]
    for other in records[1:]:
        for key, what in SHARED:
            if first[key] != other[key]:
                raise FewshotError(_refusal(first, other, what, first[key], other[key]))
        protocol = [[(f["shape"], f["ours"]["episodes"], f["ours"]["queries"], f["ours"]["seed"])
                     for f in r["figures"]] for r in (first, other)]
        if protocol[0] != protocol[1]:
            raise FewshotError(_refusal(first, other, "test protocols (shapes, episodes, "
                                        "queries, test seed)", *protocol))
    figures = []
    for i, row in enumerate(first["figures"]):
        runs = [r["figures"][i]["ours"] for r in records]
        mean, half = student_t_ci95([o["value"] for o in runs])
        ours = {"value": round(mean, 4), "ci95": None if math.isnan(half) else round(half, 4),
                "interval": "student_t_over_seeds", "seeds": [r["seed"] for r in records],
                "runs": runs, "episodes": runs[0]["episodes"], "queries": runs[0]["queries"],
                "seed": runs[0]["seed"]}
        figures.append(judged(row["shape"], row["metric"], row["paper"], ours,
                              **first["steps"], changed=first["changed"]))
    walls = [r["wall_s"] for r in records]
    return {
        "preset": first["preset"], "cite": first["cite"], "run": str(out),
        "command": " ".join(["fewshot reproduce", *overrides]),
        "checkpoint": {"file": "best.pt", "step": [r["checkpoint"]["step"] for r in records]},
        "steps": first["steps"], "changed": first["changed"],
        "protocol_from_preset": first["protocol_from_preset"], "figures": figures,
        "differences": first["differences"],
        "wall_s": {key: _total([w.get(key) for w in walls])
                   for key in ("train", "train_from_log", "eval")},
        "hardware": records[-1]["hardware"], "torch": records[-1]["torch"],
        "code": {"trained": [r["code"]["trained"] for r in records],
                 "evaluated": code_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": [r["seed"] for r in records], "runs": list(records),
    }


def _refusal(a: Mapping[str, Any], b: Mapping[str, Any], what: str, x: Any, y: Any) -> str:
    return (f"the runs of seed {a['seed']} ({a['run']}) and seed {b['seed']} ({b['run']}) differ "
            f"in their {what} ({json.dumps(x)} against {json.dumps(y)}), so their figures are "
            "not combined; bring them to the same settings (finish each to the preset's "
            "train.steps with the command that started them) or reproduce them apart")


def _total(values: Sequence[float | None]) -> float | None:
    """The sum of every run's seconds; None when one is unknown."""
    return None if any(v is None for v in values) else round(sum(values), 1)


def _require_preset(cfg: DictConfig) -> None:
    """Refuse, before anything is trained, a config that is not a paper preset (no
    experiment=, or one of the bases the presets build on, which names no test shape)."""
    if not (cfg.get("paper") or {}).get("shapes"):
        presets = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
        raise FewshotError("fewshot reproduce needs experiment=NAME, a paper preset: one of "
                           f"{', '.join(presets)}")


def _continue(ckpt: Path, overrides: list[str], resume_run: Callable[[list[str]], Any]) -> Path:
    """Continue the run of ``ckpt`` (to its train.steps or the one given) and return its
    folder; a run already at its steps is left as it is."""
    from fewshot_cli.engine.checkpoint import load_checkpoint

    stored = load_checkpoint(ckpt)["config"]
    trained = (stored.get("choices") or {}).get("experiment")
    asked = HydraConfig.get().runtime.choices.get("experiment")
    if trained is None:
        raise FewshotError(f"{ckpt} was not trained from a paper preset, so there is nothing to "
                           "compare it with; test it with fewshot eval ckpt=... instead")
    if asked is not None and asked != trained:
        raise FewshotError(f"{ckpt} was trained with experiment={trained}, not experiment="
                           f"{asked}; drop experiment= to continue it, or drop resume= to start "
                           f"a new run of {asked}")
    resume_run([o for o in overrides if not o.startswith("experiment=")])
    return ckpt.expanduser().resolve().parent


# ---------------------------------------------------------------- evaluation and the record


def evaluate_and_record(run_dir: Path, cfg: DictConfig, overrides: list[str]
                        ) -> dict[str, Any]:
    """Test ``run_dir/best.pt`` at every shape of its preset's ``paper.shapes``, print paper
    against ours and write ``reproduction.json`` (atomically, once everything is measured).
    The training time is the one ``last.pt`` records over every command that trained the run
    (null for a run whose checkpoints did not record it)."""
    from fewshot_cli.engine.checkpoint import code_version, load_checkpoint

    best = run_dir / "best.pt"
    state = load_checkpoint(best)
    preset = state["config"]["choices"]["experiment"]
    now = preset_config(preset)
    # A checkpoint written before presets carried their figures takes them from the preset.
    paper = state["config"].get("paper") or OmegaConf.to_container(now.paper)
    last = load_checkpoint(run_dir / "last.pt")
    steps = {"done": last["step"], "planned": now.train.steps}
    train_s = last.get("wall_seconds")
    logged = logged_training_seconds(run_dir / "train.log") if train_s is None else None
    changed = changes(run_dir, overrides)
    filled = preset_protocol(state["config"], now)
    started = time.perf_counter()
    figures = []
    for number, shape in enumerate(paper["shapes"], 1):  # each test has its own episode bar
        log.info("testing %s at %s (%d of the paper's %d test shapes)", best, shape, number,
                 len(paper["shapes"]))
        figures.append(figure(shape, (paper.get("figures") or {}).get(shape),
                              _evaluate(best, shape, cfg, overrides, filled), **steps,
                              changed=changed))
    record = {
        "preset": preset, "cite": paper.get("cite"), "run": str(run_dir),
        "command": " ".join(["fewshot reproduce", *overrides]),
        "checkpoint": {"file": best.name, "step": state["step"]}, "steps": steps,
        "changed": changed, "protocol_from_preset": filled, "figures": figures,
        "differences": list(paper.get("differences") or []),
        "wall_s": {"train": None if train_s is None else round(train_s, 1),
                   "train_from_log": logged,
                   "eval": round(time.perf_counter() - started, 1)},
        "hardware": hardware(cfg.device.type), "torch": _torch_version(),
        "code": {"trained": state.get("code") or "not recorded", "evaluated": code_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = run_dir / RECORD
    atomic_write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", path)
    print(table(record))
    print(f"reproduction written to {path}")
    return record


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")
STARTS = ("run folder: ", "resuming from step ")
VALIDATION = re.compile(r" - step \d+: val ")


def logged_training_seconds(log: Path) -> float | None:
    """For a run whose checkpoints predate ``wall_seconds``: the training wall time read from
    the timestamps of its ``train.log``, summed over the commands that trained it, each from
    its start to its last validation line (the steps a killed command made after its last
    checkpoint are not counted: they were made again). None without a readable log or with
    no validation line."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    total, start, last = 0.0, None, None
    for line in lines:
        stamp = LOG_LINE.match(line)
        if stamp is None:
            continue
        when = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(stamp[2]) / 1e3
        if any(s in line for s in STARTS):
            if start is not None and last is not None:
                total += last - start
            start, last = when, None
        elif VALIDATION.search(line) and start is not None:
            last = when
    if start is not None and last is not None:
        total += last - start
    return round(total, 1) if total > 0 else None


def preset_config(preset: str) -> DictConfig:
    """``experiment=preset`` as the config tree composes it now (its steps, its paper)."""
    try:
        return compose("train", [f"experiment={preset}"])
    except HydraException:
        raise FewshotError(f"experiment={preset}, which trained this run, is not a preset of "
                           "this fewshot; reproduce it with the fewshot that trained it") from None


def preset_protocol(stored: Mapping[str, Any], now: DictConfig) -> dict[str, Any]:
    """The test settings (``eval.*`` keys that change a figure) the preset sets now and the
    run's config lacks, having been written before the key existed: the run is tested with
    the preset's protocol for them (``eval.rotations``, added for Snell et al.'s rotated
    Omniglot test), and the record lists them."""
    from fewshot_cli.results import EVAL_KEYS

    preset = OmegaConf.to_container(now.eval, resolve=True)
    return {f"eval.{key}": preset[key] for key in EVAL_KEYS
            if key in preset and key not in stored.get("eval", {})}


def _evaluate(best: Path, shape: str, cfg: DictConfig, overrides: list[str],
              filled: Mapping[str, Any]) -> dict[str, Any]:
    """``fewshot eval`` of ``best`` at ``shape`` on this command's device, with the test
    settings ``filled`` from the preset: its result entry."""
    from fewshot_cli.evaluate import evaluate

    ev = compose("eval")
    ev.ckpt, ev.device = str(best), cfg.device
    for key, value in filled.items():
        ev.eval[key.removeprefix("eval.")] = value
    if match := SHAPE.fullmatch(shape):
        ev.eval.ways, ev.eval.shots = int(match[1]), int(match[2])
    if any(o.startswith("dataset.root=") for o in overrides):
        ev.dataset.root = cfg.dataset.root
    return evaluate(ev)


def changes(run_dir: Path, overrides: list[str]) -> list[str]:
    """The overrides, of the command that started the run (its ``.hydra/overrides.yaml``) and of
    this one, that make the run differ from its preset in more than its length, its seed, where
    it computes or how its validation and test are batched (the keys resume= may change)."""
    from omegaconf import OmegaConf

    from fewshot_cli.cli import RESUMABLE

    started = run_dir / ".hydra" / "overrides.yaml"
    first = [str(o) for o in OmegaConf.load(started)] if started.is_file() else []
    neutral = {*RESUMABLE, "experiment", "resume", "seed", "seeds"}
    return [o for o in dict.fromkeys([*first, *overrides])
            if o.split("=", 1)[0].lstrip("+~") not in neutral]


def figure(shape: str, paper: Mapping[str, Any] | None, result: Mapping[str, Any], done: int,
           planned: int, changed: Sequence[str] = ()) -> dict[str, Any]:
    """One row of the record: the paper's figure, ours (accuracies in %), and the verdict,
    which says first whether the run was changed from its preset or shortened."""
    metric = result.get("metric", "accuracy")
    scale = 100.0 if metric == "accuracy" else 1.0
    ci = result.get("ci95")
    ours = {"value": round(scale * result[metric], 4),
            "ci95": None if ci is None else round(scale * ci, 4),
            "episodes": result.get("episodes"), "queries": result.get("queries"),
            "seed": result.get("seed")}
    return judged(shape, metric, paper, ours, done, planned, changed)


def judged(shape: str, metric: str, paper: Mapping[str, Any] | None, ours: Mapping[str, Any],
           done: int, planned: int, changed: Sequence[str] = ()) -> dict[str, Any]:
    """A row of the record from ``ours`` (in the paper's unit): its verdict against ``paper``,
    prefixed by whether the run was changed from its preset or shortened."""
    found = verdict(paper, ours, "points" if metric == "accuracy" else "")
    if done < planned:
        found = {**found, "shortened": True,
                 "text": f"shortened ({done} of {planned} steps): {found['text']}"}
    if changed:
        found = {**found, "changed": True,
                 "text": f"changed from the preset ({' '.join(changed)}); {found['text']}"}
    return {"shape": shape, "metric": metric, "paper": dict(paper) if paper else None,
            "ours": dict(ours), "verdict": found}


def verdict(paper: Mapping[str, Any] | None, ours: Mapping[str, Any],
            unit: str = "points") -> dict[str, Any]:
    """Ours against the paper's figure, both ``{"value", "ci95"}`` in the same unit (accuracy in
    %, so gaps are percentage points; a missing CI counts as zero width).

    ``kind`` is "inside" (our mean within the paper's interval), "overlap" (the two intervals
    overlap), "below" or "above" (apart; ``text`` says by how much), or "no paper figure".
    """
    if not paper or paper.get("value") is None:
        return {"kind": "no paper figure", "gap": None, "text": "no paper figure"}
    gap = ours["value"] - paper["value"]
    amount = f"{abs(gap):.2f}{' ' + unit if unit else ''}"
    side = f"ours {amount} {'below' if gap < 0 else 'above'}"
    paper_ci, our_ci = paper.get("ci95"), ours.get("ci95") or 0.0
    if paper_ci is not None and abs(gap) <= paper_ci:
        kind, text = "inside", f"inside the paper's interval ({side})"
    elif abs(gap) <= (paper_ci or 0.0) + our_ci:
        kind = "overlap"
        text = f"CIs overlap ({side})" if paper_ci is not None else \
            f"the paper's figure is inside our CI ({side})"
    else:
        kind = "below" if gap < 0 else "above"
        text = f"{kind} the paper by {amount}"
    return {"kind": kind, "gap": round(gap, 4), "text": text}


def table(record: Mapping[str, Any]) -> str:
    """What the command prints: the run, then paper against ours, one test shape a row."""
    steps, ckpt, wall = record["steps"], record["checkpoint"], record["wall_s"]
    trained = f"{wall['train']:.0f} s" if wall["train"] is not None else \
        f"{wall['train_from_log']:.0f} s (from train.log's timestamps)" \
        if wall.get("train_from_log") else "not recorded"
    if "seeds" in record:
        lines = [f"{record['preset']}: {record['cite']}",
                 f"{len(record['seeds'])} runs (seeds {', '.join(map(str, record['seeds']))}), "
                 f"{ckpt['file']} from steps {', '.join(map(str, ckpt['step']))}; "
                 f"{steps['done']} of {steps['planned']} steps trained each; training {trained}"
                 f", evaluation {wall['eval']:.0f} s", "",
                 "| test | paper | ours: mean ± t 95% CI over seeds | each seed ± 95% CI over "
                 "its episodes | episodes | verdict |", "|---|---:|---:|---:|---:|---|"]
        for row in record["figures"]:
            lines.append(f"| {row['shape']} | {shown(row['paper'])} | {shown(row['ours'], 2)} | "
                         f"{', '.join(shown(r, 2) for r in row['ours']['runs'])} | "
                         f"{row['ours']['episodes']} | {row['verdict']['text']} |")
    else:
        lines = [f"{record['preset']}: {record['cite']}",
                 f"{ckpt['file']} from step {ckpt['step']}; {steps['done']} of "
                 f"{steps['planned']} steps trained; training {trained}, evaluation "
                 f"{wall['eval']:.0f} s", "",
                 "| test | paper | ours (95% CI) | episodes | verdict |",
                 "|---|---:|---:|---:|---|"]
        for row in record["figures"]:
            lines.append(f"| {row['shape']} | {shown(row['paper'])} | {shown(row['ours'], 2)} "
                         f"| {row['ours']['episodes']} | {row['verdict']['text']} |")
    if record.get("protocol_from_preset"):
        keys = " ".join(f"{k}={_listed(v)}" for k, v in record["protocol_from_preset"].items())
        lines += ["", f"tested with the preset's {keys} (the run was trained before the key "
                  "existed)"]
    if record["differences"]:
        lines += ["", "known protocol differences:", *(f"- {d}" for d in record["differences"])]
    return "\n".join(lines)


def _listed(value: Any) -> str:
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def shown(figure: Mapping[str, Any] | None, decimals: int | None = None,
          unverified: str = " (unverified)") -> str:
    """``98.70 ± 0.40``: a figure and its CI, a paper's in the precision it was given (or
    ``decimals``); ``—`` for none; ``unverified`` appended to a figure not verified."""
    if not figure or figure.get("value") is None:
        return "—"
    value, ci = figure["value"], figure.get("ci95")
    if decimals is None:  # YAML keeps 48.70 as 48.7: the CI's 1.84 says two decimals
        decimals = max(len(repr(float(x)).partition(".")[2]) for x in (value, ci) if x is not None)
    text = format_mean_ci(value, ci, decimals=decimals)  # figures here are already in %
    return text + (unverified if figure.get("verified") is False else "")


def hardware(device_type: str) -> dict[str, Any]:
    """The machine this command ran on: CPU model, its cores (and those this process may use),
    torch's thread count, the GPU when it computed on one, and the load average at the end."""
    import torch

    from fewshot_cli.engine.runtime import resolve_device

    device = resolve_device(device_type)
    return {"cpu": _cpu_model(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str:
    import torch

    return torch.__version__
