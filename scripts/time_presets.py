"""Seconds per meta-training step (and per validation episode) of every preset, measured briefly
on the generated glyphs at the preset's shape, so the preset table (docs/results.md) can state how long a
full run would take here. Writes ``reproductions/step_times.json`` (merging with the presets
already timed there), with the machine, torch's thread count and the load average.

The estimate uses CPU seconds (``time.process_time`` of this one-thread process), which a
busy machine inflates far less than wall time; both are stored. The glyphs are grey, so a
miniImageNet preset is timed on one channel instead of three (its first convolution only);
bandit presets are timed on their own generated bandits.

    python scripts/time_presets.py [--threads 1] [--seconds 10] [--missing] [PRESET ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "reproductions" / "step_times.json"
# Enough classes for the widest episodes (60-way training, with rotations 4x as many classes).
GLYPHS = ["dataset=glyphs", "dataset.classes.train=64", "dataset.classes.val=24",
          "dataset.classes.test=24", "dataset.images_per_class=20",
          "eval.within_group=false", "eval.distinct_drawers=false"]  # glyphs have neither


def composed(preset: str, glyphs: bool) -> object:
    from hydra import compose, initialize_config_dir

    from fewshot_cli.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", [f"experiment={preset}", "device=cpu"], return_hydra_config=True)
        if glyphs and cfg.hydra.runtime.choices.dataset != "bandits":
            size = cfg.dataset.image_size
            cfg = compose("train", [f"experiment={preset}", "device=cpu", *GLYPHS,
                                    f"dataset.image_size={size}"])
        else:
            cfg = compose("train", [f"experiment={preset}", "device=cpu"])
    return cfg


def time_preset(preset: str, seconds: float) -> dict[str, float]:
    """Median CPU and wall seconds of a meta-training step (after two warm-up steps, for
    ``seconds`` of CPU time or at least three steps) and per validation episode (8 episodes)."""
    import torch
    from omegaconf import open_dict

    from fewshot_cli.engine.trainer import MetaTrainer

    cfg = composed(preset, glyphs=True)
    with open_dict(cfg):
        cfg.train.val_episodes = 8
    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        trainer = MetaTrainer(cfg, torch.device("cpu"), Path(run_dir))
        for step in range(2):
            trainer.train_step(step)
        cpu: list[float] = []
        wall: list[float] = []
        while len(cpu) < 3 or (sum(cpu) < seconds and len(cpu) < 20):
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(2 + len(cpu))
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start)
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.validate()
        val_cpu = (time.process_time() - start_cpu) / cfg.train.val_episodes
        val_wall = (time.perf_counter() - start) / cfg.train.val_episodes
    return {"cpu_s_per_step": round(statistics.median(cpu), 4),
            "wall_s_per_step": round(statistics.median(wall), 4), "steps_timed": len(cpu),
            "cpu_s_per_val_episode": round(val_cpu, 4),
            "wall_s_per_val_episode": round(val_wall, 4),
            "load_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="default: every preset")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--missing", action="store_true",
                        help="only the presets the file does not hold yet")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from fewshot_cli.config import conf_dir
    from fewshot_cli.engine.runtime import pad_host_heap
    from fewshot_cli.reproduce import hardware

    pad_host_heap()  # as fewshot train does
    torch.set_num_threads(args.threads)
    presets = args.presets or sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
    data = json.loads(OUT.read_text()) if OUT.exists() else {"presets": {}}
    if args.missing:
        presets = [p for p in presets if p not in data["presets"]]
    load_before = os.getloadavg()
    for preset in presets:  # the file is rewritten after each preset: a long run keeps its part
        data["presets"][preset] = time_preset(preset, args.seconds)
        print(preset, data["presets"][preset], file=sys.stderr, flush=True)
        machine = hardware("cpu")
        machine["load_average"] = {"before": [round(x, 2) for x in load_before],
                                   "after": machine["load_average"]}
        data.update({"machine": machine, "torch": torch.__version__,
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(["python scripts/time_presets.py", *sys.argv[1:]])})
        data["presets"] = dict(sorted(data["presets"].items()))
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
