"""``fewshot <command> [overrides]``: a thin dispatcher onto Hydra apps: train, eval, predict,
data, report (the ``COMMANDS`` table; a new command is one entry there, its
``conf/<command>.yaml`` and its rules and path keys in options.py).

Every failure a user can cause ends here as one sentence on stderr and a non-zero exit:
our own errors (FewshotError, raised where the wrong value enters), the system's (a full disk,
a read-only folder) and Hydra's composition errors (an unknown key or option), which Hydra
prints over several lines before the task starts and which are condensed here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshot_cli import shell
from fewshot_cli.config import annotate_yaml, conf_dir, group_option, key_comments
from fewshot_cli.cores import usable_cores
from fewshot_cli.errors import FewshotError, Interrupted
from fewshot_cli.options import (
    HYDRA_FOLDERS,
    PATHS,
    check_command,
    from_launch_folder,
    path_keys,
    path_problem,
    removed_key,
)

GROUPS = ("algo", "backbone", "dataset", "augment", "device", "experiment", "hparams_search")
_failures: list[str] = []  # runs of a sweep that failed (the sweep goes on without them)
HELD: HeldStderr | None = None  # Hydra's stderr until the task starts (see main)


def _train(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train a new run in ``run_dir`` (default: the folder Hydra claimed for the command;
    ``fewshot reproduce seeds=[...]`` gives one per seed)."""
    from fewshot_cli.build import check_optimizer  # after the torch-free checks (Guarded)
    from fewshot_cli.train import sweeper_hook, train

    hydra_cfg = HydraConfig.get()
    check_optimizer(cfg)
    with open_dict(cfg):  # the group options chosen: names for hparams, results and errors
        cfg.choices = {g: hydra_cfg.runtime.choices.get(g) for g in GROUPS}
    hook = sweeper_hook(hydra_cfg.sweeper) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return train(cfg, run_dir or Path(hydra_cfg.runtime.output_dir), _hydra_files(cfg),
                 on_validation=hook)


def _hydra_files(cfg: DictConfig) -> dict[str, str]:
    """What Hydra would write into ``.hydra/``, as YAML text: the run's config, Hydra's, the
    overrides."""
    hydra_cfg = HydraConfig.get()
    files = {"config.yaml": cfg, "hydra.yaml": {"hydra": hydra_cfg},
             "overrides.yaml": hydra_cfg.overrides.task}
    return {name: OmegaConf.to_yaml(config) for name, config in files.items()}


def _eval(cfg: DictConfig) -> None:
    from fewshot_cli.evaluate import evaluate

    evaluate(cfg)


def _predict(cfg: DictConfig) -> None:
    from fewshot_cli.predict import predict

    predict(cfg)


def _data(cfg: DictConfig) -> None:
    from fewshot_cli.data_check import check_data

    check_data(cfg, HydraConfig.get().runtime.choices.get("dataset"))


def _report(cfg: DictConfig) -> None:
    from fewshot_cli.report import report

    report(cfg)


def _reproduce(cfg: DictConfig) -> None:
    from fewshot_cli.reproduce import reproduce

    reproduce(cfg, train_new=_train, resume_run=resume)


@dataclass(frozen=True)
class Command:
    """A command of ``fewshot``: its task (run by Hydra on ``conf/<name>.yaml`` composed with
    the overrides, after options.check_command), its line in ``fewshot --help``, and the key
    that a bare first argument sets (``fewshot report DIR`` is ``dir=DIR``)."""

    task: Callable[[DictConfig], Any]
    help: str
    positional: str | None = None


COMMANDS: dict[str, Command] = {
    "train": Command(_train, "meta-train an algorithm; writes TensorBoard events, last.pt and "
                             "best.pt"),
    "eval": Command(_eval, "test a checkpoint on fixed episodes: accuracy ± 95% CI, "
                           "results.json"),
    "predict": Command(_predict, "classify your images with a few examples of your classes: "
                                 "predictions.csv"),
    "data": Command(_data, "check a data set without training: splits, files, duplicates, "
                           "leaks"),
    "report": Command(_report, "summarise a sweep folder: Markdown table, report.csv, "
                               "report.png", positional="dir"),
    "reproduce": Command(_reproduce, "train a paper preset and test it at the paper's shapes: "
                                     "paper against ours, reproduction.json"),
}


def usage() -> str:
    """The top-level help: commands, config groups and their options."""
    lines = ["usage: fewshot <command> [key=value ...] [-m for a sweep] [--help]", "",
             "commands:"]
    lines += [f"  {name:<9} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "config groups (choose with group=option):"]
    for group in GROUPS:
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        lines.append(f"  {group + '=':<12}{', '.join(options) or '(none yet)'}")
    lines += ["", "examples:",
              "  fewshot train dataset=glyphs train.steps=200",
              "  fewshot train algo=protonet dataset=omniglot dataset.split=minimal",
              "  fewshot train -m train.shots=1,5 seed=0,1,2",
              "  fewshot train resume=outputs/<date>/<time>-protonet-omniglot/last.pt",
              "  fewshot train -m hydra/launcher=joblib train.shots=1,5 seed=0,1   ([cluster])",
              "  fewshot train hparams_search=protonet_omniglot   (Optuna, [cluster])",
              "  fewshot report multirun/<date>/<time>",
              "  fewshot eval ckpt=outputs/<date>/<time>-protonet-omniglot/best.pt",
              "  fewshot predict ckpt=<run>/best.pt support=my_classes/ query=new_images/",
              "  fewshot data dataset=folder dataset.root=my_images/",
              "", "`fewshot train --help` shows every key, its current value and its meaning."]
    return "\n".join(lines)


def quoted(value: str, quote: str = "'") -> str:
    """``value`` as a quoted Hydra override value, which Hydra reads back as exactly ``value``:
    the quote is escaped, and so is a run of backslashes before it or at the end (Hydra's
    rule; other backslashes stand for themselves)."""
    value = re.sub(rf"(\\+)(?={quote}|$)", lambda m: m.group(1) * 2, value)
    return quote + value.replace(quote, "\\" + quote) + quote


def hydra_arg(key: str, value: str) -> str:
    """``key=value`` quoted for Hydra (double quotes) and then for the shell, to print in a
    message for the user to copy: ``'ckpt="a,b/best.pt"'``."""
    return shell.arg(key, quoted(value, '"'))


def _as_hydra_value(value: str) -> str:
    """``value`` as it must be written for Hydra to read it back as this one string: as is
    where that already works (``runs/a.pt``), else quoted (commas, spaces, ``=``, parentheses,
    quotes, non-ASCII letters, and names such as ``true`` or ``1e3`` Hydra reads as values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"key={value}")
        if not parsed.is_sweep_override() and parsed.value() == value:
            return value
    except Exception:  # noqa: BLE001 (any grammar error: quote it)
        pass
    return quoted(value)


# Hydra's sweep functions: a value written as one of these is a sweep the user wrote on purpose.
SWEEP_FUNCTIONS = re.compile(r"^(choice|range|interval|glob|sort|shuffle|tag)\(")


def quote_paths(args: list[str], command: str, multirun: bool) -> list[str]:
    """``args`` with the value of every path key of ``command`` (options.PATHS) written so that
    Hydra reads it as the path the user typed, whatever it holds.

    Outside a sweep a path key holds one path, so a comma is part of it (Hydra would refuse it
    as ambiguous otherwise). Under ``-m`` a comma list is a sweep over several paths: split
    where each piece is a path that exists, else at every comma. A value already quoted, null,
    or written as a sweep function (``glob(...)``) is left as it is.

    Raises:
        FewshotError: a comma list of existing paths outside a sweep (add -m), or one that can
            be cut into existing paths in two ways under -m (quote each path).
    """
    keys = PATHS.get(command) or path_keys()
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        rule = keys.get(key.lstrip("+~"))
        if not eq or rule is None or value in ("", "null") or value[0] in "'\"" or \
                SWEEP_FUNCTIONS.match(value):
            out.append(arg)
            continue
        paths = _sweep_paths(key, value) if multirun and rule.sweep else [value]
        if not multirun and not _exists(value) and len(cuts := _cuts(value)) == 1:
            raise FewshotError(f"{key}={value} names {len(cuts[0])} paths; add -m to run once "
                               f"per path: {shell.command(command, '-m', shell.arg(key, value))}")
        if key.lstrip("+~") in HYDRA_FOLDERS:  # Hydra makes them as written: ~ is ours to expand
            paths = [os.path.expanduser(p) for p in paths]
        out.append(f"{key}=" + ",".join(_as_hydra_value(p) for p in paths))
    return out


def _exists(path: str) -> bool:
    return os.path.lexists(os.path.expanduser(path))


def _cuts(value: str) -> list[list[str]]:
    """Up to two ways to cut a comma list into two or more paths that all exist."""
    parts = value.split(",")
    ways: list[list[list[str]]] = [[] for _ in parts] + [[[]]]  # ways[i]: cuts of parts[i:]
    for i in range(len(parts) - 1, -1, -1):
        for j in range(i + 1, len(parts) + 1):
            head = ",".join(parts[i:j])
            if _exists(head):
                ways[i] += [[head, *rest] for rest in ways[j]][:2 - len(ways[i])]
    return [way for way in ways[0] if len(way) > 1]


def _sweep_paths(key: str, value: str) -> list[str]:
    """The paths of a sweep's comma list: the whole value where it is one path that exists,
    else the one way to cut it into paths that all exist, else the pieces between commas."""
    if _exists(value) or "," not in value:
        return [value]
    cuts = _cuts(value)
    if len(cuts) > 1:
        one, two = (" and ".join(cut) for cut in cuts)
        each = ",".join(quoted(cut, '"') for cut in cuts[0])
        raise FewshotError(f"{key}={value} can be read as the paths {one}, or as {two}; quote "
                           f"each path: {shell.arg(key, each)}")
    return cuts[0] if cuts else value.split(",")


def _fail(message: str, code: int) -> None:
    """Print the one sentence (under torchrun, rank 0 alone speaks) and exit with ``code``.

    From here on Ctrl-C is ignored: the sentence already says what the folder holds, and a
    late second Ctrl-C while Python unwinds would otherwise end the process by SIGINT (exit
    status -2) instead of ``code``."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("RANK", "0") == "0":
        print(f"fewshot: error: {message}", file=sys.stderr)
    sys.exit(code)


def one_sentence(err: BaseException) -> tuple[str, int] | None:
    """The message and exit status for an error a user can cause, or None for a bug."""
    from fewshot_cli.files import advice, os_error_in

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, FewshotError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return str(cause), 130 if isinstance(cause, Interrupted) else 1
    system = os_error_in(err)
    if system is not None:
        where = f" {system.filename}" if system.filename else ""
        return f"could not use{where}: {system.strerror}; {advice(system)}", 1
    if isinstance(err, MemoryError):
        return "out of memory; lower train.meta_batch, eval.batch or the image size", 1
    return None


def interrupted() -> str:
    """What a Ctrl-C that stopped a command leaves behind: the files it wrote in full (each
    atomically, so none is half-written), or nothing. A training run says more itself (its
    checkpoints and their steps, see RunFolder)."""
    from fewshot_cli.files import written

    kept = [str(p) for p in dict.fromkeys(written()) if p.exists()]
    if not kept:
        return "interrupted; nothing was written"
    more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
    return f"interrupted; written in full before the stop: {', '.join(kept[:3])}{more}"


class SweepRunFailed(CompactHydraException):
    """A run of a sweep that failed: Hydra records it as failed and goes on with the others
    (Optuna counts it against ``hydra.sweeper.max_failure_rate``), then prints this one line."""


def guarded(run: Callable[[], Any], command: str, cfg: DictConfig | None = None) -> Any:
    """``run()``, with our errors as one sentence and a non-zero exit. In a sweep a failed run
    prints its sentence and the sweep goes on without it (see SweepRunFailed)."""
    try:
        return run()
    except KeyboardInterrupt:
        _fail(interrupted(), 130)
    except Exception as err:
        known = one_sentence(err)
        if known is None:
            raise
        message, code = known
        if code != 130 and HydraConfig.initialized() and \
                HydraConfig.get().mode == RunMode.MULTIRUN:  # an interruption stops the sweep
            from fewshot_cli.engine.run_folder import record_failed_run

            print(f"fewshot: error: {message}", file=sys.stderr)
            _failures.append(message)
            if command == "train" and cfg is not None:
                record_failed_run(Path(HydraConfig.get().runtime.output_dir),
                                  _hydra_files(cfg), message)
            raise SweepRunFailed(f"fewshot: error: a run of the sweep failed: {message}") \
                from None
        _fail(message, code)


class Guarded:
    """Runs a command's task under :func:`guarded`: first every option is checked
    (options.check_command, torch-free, before anything is read), then the task; a run that
    fails leaves no empty folder behind.

    A top-level class naming its command, so that launchers that run the task in other
    processes (joblib, submitit) can pickle it; what Hydra printed before the task is held in
    the module's ``HELD`` of the process that composed the config.
    """

    def __init__(self, command: str) -> None:
        self.command = command

    def __call__(self, cfg: DictConfig) -> Any:
        if HELD is not None:
            HELD.release()
        return guarded(lambda: self._checked_task(cfg), self.command, cfg)

    def _checked_task(self, cfg: DictConfig) -> Any:
        from fewshot_cli.engine.run_folder import discard_if_empty

        try:
            if HydraConfig.initialized() and HydraConfig.get().job.chdir:
                with open_dict(cfg):
                    from_launch_folder(self.command, cfg, Path(HydraConfig.get().runtime.cwd))
            check_command(self.command, cfg)
            return COMMANDS[self.command].task(cfg)
        except BaseException:
            if HydraConfig.initialized():  # the folder Hydra made for a run that never began
                discard_if_empty(Path(HydraConfig.get().runtime.output_dir))
            raise


# What Hydra writes after the sentence of a failed run of a sweep: the run's overrides, the
# sentence again (SweepRunFailed's text) and its HYDRA_FULL_ERROR hint.
SWEEP_NOISE = re.compile(r"\s*(Error executing job with overrides: |fewshot: error: a run of the "
                         r"sweep failed: |Set the environment variable HYDRA_FULL_ERROR=1 )")


class SweepStderr:
    """stderr during a sweep, less what Hydra adds to a failed run's one sentence
    (``SWEEP_NOISE``; Hydra writes each of those in one piece)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, text: str) -> int:
        return len(text) if SWEEP_NOISE.match(text) else self.real.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class HeldStderr:
    """Holds back what Hydra writes to stderr until the task starts, so that a composition
    error (an unknown key, a missing option) can be replaced by one sentence; in a ``sweep``,
    stderr is then a SweepStderr until Hydra is done."""

    def __init__(self, sweep: bool = False) -> None:
        self.real, self.buffer, self.released = sys.stderr, io.StringIO(), False
        self.out = SweepStderr(self.real) if sweep else self.real

    def __enter__(self) -> HeldStderr:
        sys.stderr = self.buffer
        return self

    def release(self) -> None:
        if not self.released:
            self.released = True
            sys.stderr = self.out
            self.out.write(self.buffer.getvalue())

    def __exit__(self, *exc: object) -> None:
        sys.stderr = self.real

    def text(self) -> str:
        return self.buffer.getvalue()


RESOLVER_ERROR = re.compile(r"FewshotError raised while resolving interpolation: (.+)")


def condense(text: str, command: str, args: list[str]) -> tuple[str, int]:
    """One sentence and an exit status for what Hydra printed when composing the config or
    making the run's folder failed (``args``: the overrides given)."""
    help_hint = f"see fewshot {command} --help"
    if m := re.search(r"Could not find '([\w/]+)/([^']+)'\s+Available options in '[^']+':"
                      r"((?:\n\t\S+)+)", text):
        group, option, options = m.group(1), m.group(2), m.group(3).split()
        return f"{group}={option} is not an option; choose one of: {', '.join(options)}", 2
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        if gone := removed_key(key):
            return gone, 2
        if near := closest_key(command, key, args):
            return f"{key} is not a key of this config; did you mean {near}? ({help_hint}; " \
                   f"to add a new key write +{key}=...)", 2
        return f"{key} is not a key of this config ({help_hint}); to add a new key write " \
               f"+{key}=...", 2
    if m := re.search(r"Could not (?:append to|delete from) config\. '?([^'\s.]+(?:\.\S+)?)", text):
        return f"{m.group(1).rstrip('.')}: cannot add or delete this key ({help_hint})", 2
    if m := re.search(r"Ambiguous value for argument '([^'=]+)=([^']*)'", text):
        key, value = m.groups()
        return f"{key}={value} holds commas: add -m to run once per value (a sweep), write " \
               f"{key}=[{value}] for a list, or quote it to keep it one string: " \
               f"{hydra_arg(key, value)}", 2
    if "override_grammar" in text:  # the override parser's errors end with this link
        bad = _unreadable(args)
        key, _, value = (bad or "").partition("=")
        quote = f"; to pass one string holding spaces or symbols, quote it: " \
                f"{hydra_arg(key, value)}" if value else ""
        what = f"the override '{bad}'" if bad else "an override"
        return f"cannot read {what}: write key=value, or key=a,b,c with -m for a sweep" \
               f"{quote} ({help_hint})", 2
    if m := RESOLVER_ERROR.search(text):
        return m.group(1).strip(), 1
    if m := re.search(r"\[Errno (\d+)\] ([^:\n]+): '([^'\n]*)'", text):
        from fewshot_cli.files import advice

        key = "hydra.sweep.dir" if _sweeping(args) else "hydra.run.dir"
        return f"cannot make the run folder {m.group(3)} ({key}): {m.group(2)}; " \
               f"{advice(OSError(int(m.group(1)), m.group(2)))}", 1
    if m := re.search(r"Error merging override (\S+)\n(.+)", text):
        return f"{m.group(1)}: {m.group(2).strip()}", 2
    lines = [line.strip() for line in text.splitlines() if line.strip() and
             "HYDRA_FULL_ERROR" not in line and not line.startswith(("Traceback", "File "))]
    if lines and lines[-1].startswith("fewshot: error: "):  # a sentence of ours, from a job of
        return lines[-1].removeprefix("fewshot: error: "), 1  # another process: said as it is
    return (lines[-1] if lines else "the config could not be composed") + f" ({help_hint})", 2


def closest_key(command: str, key: str, args: list[str]) -> str | None:
    """The key of the config these overrides compose (``args`` less the one that set
    ``key``) that is spelled most like ``key`` (``train.ways`` for ``train.wayz``), or None."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    kept = [a for a in args if not a.startswith(("-", "hydra", f"{key}=", f"+{key}="))
            and "=" in a]
    groups = [a for a in kept if a.split("=", 1)[0] in GROUPS]
    cfg = None
    for overrides in (kept, groups):  # the groups alone when another override is wrong too
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(str(conf_dir()), version_base="1.3"):
                cfg = compose(command, [a for a in overrides if "," not in a])
            break
        except Exception:  # noqa: BLE001, S112 (Hydra's errors have several types)
            continue
        finally:
            GlobalHydra.instance().clear()
    if cfg is None:
        return None
    keys = [k for k in _dotted_keys(OmegaConf.to_container(cfg)) if not k.startswith("hydra")]
    found = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return found[0] if found else None


def _dotted_keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out += [name, *(_dotted_keys(value, name) if isinstance(value, dict) else [])]
    return out


def _sweeping(args: list[str]) -> bool:
    """Whether these overrides start a sweep: ``-m``, or an Optuna search space (which sets
    Hydra's mode itself)."""
    return bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(args)) or any(
        a.startswith("hparams_search=") and a != "hparams_search=null" for a in args)


def _unreadable(args: list[str]) -> str | None:
    """The first of ``args`` that Hydra's override grammar cannot read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_override(arg)
        except Exception:  # noqa: BLE001 (the grammar's errors have several types)
            return arg
    return None


# ---------------------------------------------------------------- resuming a run

# What a resumed run may change: how long it runs, how often it validates and logs, where its
# data lives and how (not what) it computes. Anything else would make the checkpoint's weights,
# optimizer state or random state belong to a config other than the one it records.
RESUMABLE = ("train.steps", "train.max_minutes", "train.val_every", "train.val_episodes",
             "train.log_every", "eval.batch", "eval.episodes", "dataset.root", "dataset.download",
             "dataset.allow_duplicates", "device",
             "device.type", "device.precision", "device.memory_format", "algo.batching",
             "algo.task_chunk", "algo.checkpoint_steps")


_MISSING = object()


def resume(args: list[str]) -> float:
    """``fewshot train resume=PATH [key=value ...]``: continue a run in its own folder with its
    stored config; only the keys of ``RESUMABLE`` may change, anything else is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as err:
        raise FewshotError(f"cannot read the overrides {' '.join(args)} ({err}); write "
                           "key=value") from None
    path = Path(str(next(o.value() for o in overrides if o.key_or_group == "resume")))
    if problem := path_problem("resume", str(path), "checkpoint"):
        raise FewshotError(problem)
    from fewshot_cli.build import check_optimizer  # torch from here on
    from fewshot_cli.engine.checkpoint import load_checkpoint
    from fewshot_cli.train import train

    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    for o in overrides:
        key = o.key_or_group
        if key == "resume":
            continue
        if o.is_sweep_override() or o.is_add() or o.is_delete() or key not in RESUMABLE:
            raise FewshotError(
                f"resume cannot change {o.input_line}: the checkpoint's weights, optimizer and "
                f"random state belong to its stored config; resume may change only "
                f"{', '.join(RESUMABLE)}; start a new run for other settings")
        if key == "device":
            cfg.device = group_option("device", _group_file("device", str(o.value())).stem)
        elif OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise FewshotError(f"resume cannot change {o.input_line}: the run's config has no "
                               f"{key}")
        else:
            OmegaConf.update(cfg, key, o.value(), merge=False)
    _check_steps_followers(state, cfg)
    cfg.resume = str(path)
    # its init_from only records where the run began (the checkpoint holds every weight since):
    # that file may have moved or gone
    check_command("train", OmegaConf.merge(cfg, {"init_from": None}))
    check_optimizer(cfg)
    _check_latest(path, state)
    logging.getLogger(__name__).info("resuming %s at step %d%s", path, state["step"],
                                     f" with {' '.join(args[1:])}" if len(args) > 1 else "")
    return train(cfg, path.expanduser().resolve().parent, state=state)


def _check_steps_followers(state: dict[str, Any], cfg: DictConfig) -> None:
    """A resume with another ``train.steps`` would leave the schedules computed from it (Reptile's
    outer-step annealing, a ``${train.steps}`` scheduler) at the old length, so it would not be
    the run of the new length: refuse it."""
    before, after = state["config"]["train"]["steps"], cfg.train.steps
    keys = state.get("follows_steps") or []
    if after != before and keys:
        raise FewshotError(
            f"resume cannot change train.steps from {before} to {after}: {', '.join(keys)} "
            f"{'was' if len(keys) == 1 else 'were'} set from train.steps when the run started, "
            f"so the resumed run would not be the run of {after} steps; start a new run with "
            f"train.steps={after}")


def _group_file(group: str, option: str) -> Path:
    path = conf_dir() / group / f"{option}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))
        raise FewshotError(f"{group}={option} is not an option; choose one of: {options}")
    return path


def _check_latest(path: Path, state: dict[str, Any]) -> None:
    """Resuming an older checkpoint would overwrite the folder's later last.pt: refuse it."""
    last = path.expanduser().resolve().parent / "last.pt"
    if last.exists() and last.resolve() != path.expanduser().resolve():
        from fewshot_cli.engine.checkpoint import load_checkpoint

        newer = load_checkpoint(last)["step"]
        if newer > state["step"]:
            raise FewshotError(f"{path} is at step {state['step']} but {last} is at step "
                               f"{newer}, and resuming would overwrite it; continue from it: "
                               f"{shell.command('train', shell.arg('resume', last))}")


def _resuming(args: list[str]) -> bool:
    return any(a.startswith("resume=") and a != "resume=null" for a in args)


def _console_logging() -> None:
    """What Hydra's job logging sets up, for the commands that do not go through Hydra."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# ---------------------------------------------------------------- entry point


def machine_is_shared(argv: list[str], loadavg: str | None = None) -> bool:
    """Whether this command shares the CPU with other work: a sweep (``-m``), torchrun's local
    ranks, or a machine whose runnable tasks (``/proc/loadavg``: the 1-minute load and the
    tasks runnable now, this one aside) already fill the cores this process may use."""
    if {"-m", "--multirun"} & set(argv) or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
        return True
    try:
        fields = (loadavg if loadavg is not None else Path("/proc/loadavg").read_text()).split()
        return max(float(fields[0]), int(fields[3].split("/")[0]) - 1) >= usable_cores()
    except (OSError, IndexError, ValueError):
        return False


def set_wait_policy(argv: list[str]) -> None:
    """On a shared machine, OpenMP threads that wait for work sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``): beside busy processes the spinning threads took most of the
    CPU from the work itself; on an idle one spinning is faster (MAML's many small kernels).
    ``scripts/bench_threads.py`` measures both. Read by OpenMP when torch loads, so called
    before any torch import; an OMP_WAIT_POLICY of the user's own is kept."""
    if "OMP_WAIT_POLICY" not in os.environ and machine_is_shared(argv):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fewshot`` console script."""
    set_wait_policy(sys.argv[1:] if argv is None else argv)
    try:
        _main(argv)
    except BrokenPipeError:  # `fewshot --help | head`: the reader left early, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # what a shell reports for a process stopped by SIGPIPE


def _main(argv: list[str] | None) -> None:
    shell.remember_program(sys.argv[0])  # for the commands we print to copy (Hydra rewrites argv)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _fail(f"unknown command '{name}'; choose one of: {', '.join(COMMANDS)} "
              "(see fewshot --help)", 2)
    multirun = bool({"-m", "--multirun"} & set(rest))
    positional = COMMANDS[name].positional
    if positional and rest and not rest[0].startswith("-") and (
            _exists(rest[0]) or "=" not in rest[0]):  # a sweep's run folders may hold '='
        rest = [f"{positional}={rest[0]}", *rest[1:]]
    try:
        rest = quote_paths(rest, name, multirun)
    except FewshotError as err:
        _fail(str(err), 2)
    global HELD
    held = HELD = HeldStderr(sweep=_sweeping(rest))
    if name == "train" and _resuming(rest) and not {"-h", "--help"} & set(rest):
        if multirun:
            _fail("resume= continues one run; it cannot be part of a sweep (-m)", 2)
        _console_logging()
        guarded(lambda: resume(rest), "train")
        return
    _run_hydra(name, rest, held)


def _help_with_meanings(show: Callable[[], None], name: str, rest: list[str]) -> str:
    """What Hydra's ``--help`` prints (``show``), each key of the config with its meaning:
    the comment beside it in conf/."""
    import yaml  # PyYAML comes with omegaconf

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):  # Hydra exits 0
        show()
    defaults = yaml.safe_load((conf_dir() / f"{name}.yaml").read_text()).get("defaults", [])
    choices = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}
    choices.update(a.split("=", 1) for a in rest if re.fullmatch(r"[\w/]+=[\w.-]+", a))
    return annotate_yaml(out.getvalue().rstrip("\n"), key_comments(name, choices))


def _run_hydra(name: str, rest: list[str], held: HeldStderr) -> None:
    """Compose ``conf/<name>.yaml`` with the overrides ``rest`` and run the command's task (or
    sweep over it); Hydra's own failures before the task become one sentence."""
    from fewshot_cli.engine.run_folder import claim_new_dir, scratch_dir

    OmegaConf.register_new_resolver("fewshot.new_dir", claim_new_dir, use_cache=True,
                                    replace=True)
    OmegaConf.register_new_resolver("fewshot.scratch_dir", scratch_dir, use_cache=True,
                                    replace=True)
    sys.argv = [f"fewshot {name}", *rest]
    app = hydra.main(config_path=str(conf_dir()), config_name=name, version_base="1.3")
    try:
        with held:
            if {"-h", "--help"} & set(rest):
                print(_help_with_meanings(lambda: app(Guarded(name))(), name, rest))
            else:
                app(Guarded(name))()
    except SystemExit as done:
        if done.code not in (0, None) and not held.released:
            _fail(*condense(held.text(), name, rest))
        if done.code not in (0, None) and _failures:  # each said why; Hydra's words dropped
            _fail(f"{len(_failures)} run(s) of the sweep failed (see above)", 1)
        raise
    except Exception as err:  # Hydra re-raises what it cannot shorten (a resolver's error)
        ours = RESOLVER_ERROR.search(str(err))  # OmegaConf keeps only our error's text
        known = None if held.released else (ours.group(1), 1) if ours else one_sentence(err)
        if known is None:
            sys.stderr.write("" if held.released else held.text())
            raise
        _fail(*known)
    if not held.released:
        sys.stderr.write(held.text())
    if _failures:
        _fail(f"{len(_failures)} run(s) of the sweep failed (see above)", 1)


if __name__ == "__main__":
    main()
