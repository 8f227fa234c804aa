"""What the tests share: the tiny configs, checks of a finished command (``ok``, ``failed``,
``one_sentence``) and composing the train config as the CLI composes it (``compose``,
``plain``). Fixtures (``cli``, ``fewshot``, ``omniglot_root`` ...) live in conftest.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshot_cli.cli import GROUPS
from fewshot_cli.config import conf_dir
from fewshot_cli.engine.checkpoint import load_checkpoint

# Small and fast: glyphs at 28 px, a narrow Conv4 (the bad-input and results tests).
TINY = ["dataset=glyphs", "dataset.classes.train=20", "dataset.classes.val=8",
        "dataset.classes.test=8", "backbone.hidden=8", "train.queries=3", "eval.queries=3",
        "train.val_episodes=4", "eval.episodes=8", "device=cpu"]
# A little larger, for the tests that compare scores (the CLI, report, search and sweep tests).
SMALL = ["dataset=glyphs", "dataset.classes.train=40", "dataset.classes.val=10",
         "dataset.classes.test=10", "backbone.hidden=16", "train.queries=5", "eval.queries=5",
         "train.val_episodes=10", "eval.episodes=20", "device=cpu"]
DATA = "/FEWSHOT_DATA"  # stands for $FEWSHOT_DATA in ``plain``: data roots compare across machines


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc``, which must have succeeded (else its output is the failure's message)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def failed(proc: subprocess.CompletedProcess) -> str:
    """The error text of a command that must fail without a traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def one_sentence(proc: subprocess.CompletedProcess, *words: str, code: int | None = None) -> str:
    """The single error sentence of a failed command, which must mention every one of words
    (and exit with ``code`` where given)."""
    failed(proc)
    if code is not None:
        assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fewshot: error:")]
    assert len(errors) == 1, proc.stderr
    assert "\x1b" not in errors[0], errors[0]  # no terminal escape codes in the sentence
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def recorded_hparams(run: Path) -> dict[str, Any]:
    """The hparams that TensorBoard's HPARAMS tab shows for the run folder ``run``: the
    session start info in its event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    values: dict[str, Any] = {}
    for events in sorted(run.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams")
        except KeyError:  # a file without hparams
            continue
        for content in contents.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            for key, value in data.session_start_info.hparams.items():
                values[key] = value.string_value or value.number_value
    return values


def assert_readable(fig: Any) -> None:
    """A report figure (``fewshot_cli.report.figure``) that shows everything it draws: every
    panel and text inside the canvas, no legend over any panel's data, no two tick labels of
    an axis on each other, and a run count (``n=3``) beside every mean drawn."""
    from matplotlib.legend import Legend

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox.padded(1)  # a pixel of rounding

    def inside(box: Any) -> bool:
        return canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and \
            canvas.y0 <= box.y0 and box.y1 <= canvas.y1

    panels = [ax for ax in fig.axes if ax.get_visible()]
    for ax in panels:  # its tight box holds what it draws: labels, title, legend, texts
        assert inside(ax.get_tightbbox(renderer)), f"panel {ax.get_title()!r} is clipped"
    for text in [fig._suptitle, *fig.texts]:
        if text is not None and text.get_text():
            assert inside(text.get_window_extent(renderer)), f"{text.get_text()!r} is clipped"
    for legend in fig.findobj(Legend):
        box = legend.get_window_extent(renderer)
        for ax in panels:
            assert not box.overlaps(ax.bbox), f"a legend covers panel {ax.get_title()!r}"
    for ax in panels:
        for axis, centre, (low, high) in ((ax.xaxis, lambda b: (b.x0 + b.x1) / 2,
                                           ax.bbox.intervalx),
                                          (ax.yaxis, lambda b: (b.y0 + b.y1) / 2,
                                           ax.bbox.intervaly)):
            labels = [box for t in axis.get_ticklabels() if t.get_visible() and t.get_text()
                      and low - 1 <= centre(box := t.get_window_extent(renderer)) <= high + 1]
            for i, a in enumerate(labels):
                assert not any(a.overlaps(b) for b in labels[i + 1:]), \
                    f"tick labels overlap on {ax.get_title()!r}: {axis.get_ticklabels()}"
        means = sum(len(bars.lines[0].get_xdata()) for bars in ax.containers
                    if hasattr(bars, "has_yerr"))
        counts = [t for t in ax.texts if t.get_text().startswith("n=")]
        assert len(counts) == means, f"{ax.get_title()!r}: {means} means, {len(counts)} counts"


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's weights stored in the checkpoint at ``path``."""
    return load_checkpoint(path)["model"]


def compose(overrides: list[str], hydra: bool = False, config: str = "train") -> DictConfig:
    """The config ``fewshot train`` composes from ``overrides``, with the group options chosen
    in ``choices`` as the CLI records them; Hydra's own section kept only if ``hydra``."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config, overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
        if not hydra:
            del cfg.hydra
    return cfg


def plain(overrides: list[str]) -> dict[str, Any]:
    """``compose(overrides)`` resolved into plain data, with $FEWSHOT_DATA read as ``DATA``."""
    before = os.environ.get("FEWSHOT_DATA")
    os.environ["FEWSHOT_DATA"] = DATA
    try:
        return OmegaConf.to_container(compose(overrides), resolve=True)
    finally:
        if before is None:
            del os.environ["FEWSHOT_DATA"]
        else:
            os.environ["FEWSHOT_DATA"] = before


# Keys the config tree gained after the saved snapshots of composed configs were written: the
# split checks' duplicate switch (issue 19), the transfer baselines' train.yaml keys, init_from
# and ProtoNet's cosine scale (issue 22), the rotated test protocol (issue 20). Snapshot tests
# set them aside where a snapshot lacks them.
ADDED_KEYS = ("dataset.allow_duplicates", "init_from", "train.batch_size", "train.max_minutes",
              "train.budget_clock", "algo.scale", "algo.learn_scale", "eval.rotations",
              "device.threads")
