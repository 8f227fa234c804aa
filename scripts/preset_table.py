"""The table of paper presets in docs/results.md, generated from conf/experiment (each preset's
paper figures and test shapes) and reproductions/ (our records, and the measured time per step that
estimates a full run for a preset without one). Never edit the table by hand.

    python scripts/preset_table.py            # print the table
    python scripts/preset_table.py --write    # rewrite the marked block of docs/results.md
    python scripts/preset_table.py --check    # exit 1 when docs/results.md's block is out of date
    python scripts/preset_table.py --add RUN  # copy RUN's reproduction.json and validation lines
                                              # (each seed's, for a run folder of
                                              # reproduce seeds=[...]) into
                                              # reproductions/<preset>/, then --write
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from fewshot_cli.reproduce import shown

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "results.md"
RECORDS = REPO / "reproductions"
START, END = "<!-- preset-table: start -->", "<!-- preset-table: end -->"
VALIDATION_LINE = re.compile(r"step \d+: val ")  # what the trainer logs after each validation


def presets() -> dict[str, Any]:
    """Every preset's composed config, by name (plain data)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fewshot_cli.config import conf_dir

    names = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return {name: OmegaConf.to_container(compose("train", [f"experiment={name}"]))
                for name in names}


def _records() -> dict[str, dict[str, Any]]:
    return {path.parent.name: json.loads(path.read_text())
            for path in sorted(RECORDS.glob("*/reproduction.json"))}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(cfg: dict[str, Any], timing: dict[str, float]) -> float:
    """CPU seconds of a full run on one thread: the steps, their validations and the tests."""
    t, e = cfg["train"], cfg["eval"]
    validations = math.ceil(t["steps"] / t["val_every"])
    episodes = validations * t["val_episodes"] + e["episodes"] * len(cfg["paper"]["shapes"])
    return t["steps"] * timing["cpu_s_per_step"] + episodes * timing["cpu_s_per_val_episode"]


def _figure(fig: dict[str, Any] | None, notes: list[str]) -> str:
    """``98.7 ± 0.4 [2]``: the figure, its CI, the number of its source below the table (†:
    not verified in any text)."""
    if not fig or fig.get("value") is None:
        return "—"
    if fig["read"] not in notes:
        notes.append(fig["read"])
    return f"{shown(fig, unverified='')} [{notes.index(fig['read']) + 1}]" + \
        ("†" if fig.get("verified") is False else "")


def _ours(row: dict[str, Any] | None) -> str:
    """Our figure: ± over the test episodes of one run, or over a record's seeds (Student t),
    each seed's own figure and episode interval beside it."""
    if row is None:
        return "not run"
    ours = row["ours"]
    if "runs" not in ours:
        return f"{shown(ours, 2)} ({ours['episodes']} episodes)"
    each = "; ".join(shown(r, 2) for r in ours["runs"])
    return (f"{shown(ours, 2)} over {len(ours['runs'])} seeds (Student t); per seed {each} "
            f"({ours['episodes']} episodes each)")


def _run(record: dict[str, Any] | None, cfg: dict[str, Any], timing: dict | None) -> str:
    if record is not None:
        h, wall = record["hardware"], record["wall_s"]
        trained = f"{_duration(wall['train'])} training" if wall["train"] is not None else \
            f"{_duration(wall['train_from_log'])} training (from train.log)" \
            if wall.get("train_from_log") else "training time not recorded"
        return (f"{trained} + {_duration(wall['eval'])} tests, "
                f"{record['steps']['done']} of {record['steps']['planned']} steps, {h['cpu']} "
                f"({h['torch_threads']} thread{'s' if h['torch_threads'] != 1 else ''}"
                f"{', ' + h['gpu'] if h.get('gpu') else ''}), "
                f"torch {record['torch']}")
    if timing is None:
        return "not timed"
    return (f"est. {_duration(estimate(cfg, timing))} on one core "
            f"({timing['cpu_s_per_step']:.3g} s/step)")


def render() -> str:
    """The Markdown block between the page's markers."""
    configs, records = presets(), _records()
    timings_file = RECORDS / "step_times.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    notes: list[str] = []
    lines = ["| preset | test | paper | ours (95% CI) | verdict | run |",
             "|---|---|---:|---:|---|---|"]
    for name, cfg in configs.items():
        paper, record = cfg["paper"], records.get(name)
        rows = {r["shape"]: r for r in record["figures"]} if record else {}
        for shape in paper["shapes"]:
            row = rows.get(shape)
            verdict = row["verdict"]["text"] if row else ""
            lines.append(f"| `{name}` | {shape} | "
                         f"{_figure((paper.get('figures') or {}).get(shape), notes)} | "
                         f"{_ours(row)} | {verdict} | "
                         f"{_run(record, cfg, timings.get('presets', {}).get(name))} |")
    lines += ["", "Where each paper figure was read (†: not found in any text searched, so "
              "unverified):", ""]
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    if timings:
        m, loads = timings["machine"], [t["load_1min"] for t in timings["presets"].values()]
        lines += ["", f"Estimates: CPU seconds per step and per validation episode measured on "
                  f"the generated glyphs at each preset's shape (`{timings['command']}`, "
                  f"{timings['date'][:10]}), {m['cpu']}, {m['cores']} cores, "
                  f"{m['torch_threads']} thread, torch {timings['torch']}. The machine was "
                  f"shared: its 1-minute load average was {min(loads)} to {max(loads)}, so wall "
                  "times were longer (both are in reproductions/step_times.json)."]
    return "\n".join(lines)


def page_block(text: str) -> str:
    """The generated block of docs/results.md's ``text`` (between the markers)."""
    try:
        return text.split(START, 1)[1].split(END, 1)[0].strip("\n")
    except IndexError:
        sys.exit(f"docs/results.md has no {START} ... {END} block")


def add(run: Path) -> Path:
    """Copy ``run``'s reproduction.json and the validation lines of its train.log into
    ``reproductions/<preset>/`` (a record over seeds: each seed's lines into
    ``validation.seed<N>.log``); returns that folder. The record and validation logs replace
    the preset's earlier ones; other files there (NOTES.md) stay."""
    record = json.loads((run / "reproduction.json").read_text())
    folder = RECORDS / record["preset"]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("validation*.log"):
        old.unlink()
    shutil.copyfile(run / "reproduction.json", folder / "reproduction.json")
    logs = {f"validation.seed{r['seed']}.log": run / f"seed{r['seed']}" / "train.log"
            for r in record["runs"]} if "runs" in record else {"validation.log": run / "train.log"}
    for name, log in logs.items():
        lines = log.read_text().splitlines() if log.exists() else []
        (folder / name).write_text(
            "".join(line + "\n" for line in lines if VALIDATION_LINE.search(line)))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    group.add_argument("--add", type=Path, metavar="RUN")
    args = parser.parse_args()
    if args.add:
        print(f"record copied into {add(args.add)}")
    table = render()
    text = PAGE.read_text()
    if args.check:
        if page_block(text) != table:
            sys.exit("docs/results.md's preset table is out of date: "
                     "python scripts/preset_table.py --write")
        return
    if args.write or args.add:
        before, rest = text.split(START, 1)
        PAGE.write_text(f"{before}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")
        print(f"{PAGE} rewritten")
        return
    print(table)


if __name__ == "__main__":
    main()
