"""``fewshot <command> [overrides]``: a thin dispatcher onto Hydra apps: train, eval, predict,
data, report.

Every failure a user can cause ends here as one sentence on stderr and a non-zero exit:
our own errors (FewshotError, raised where the wrong value enters), the system's (a full disk,
a read-only folder) and Hydra's composition errors (an unknown key or option), which Hydra
prints over several lines before the task starts and which are condensed here.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshot_cli.config import conf_dir
from fewshot_cli.errors import FewshotError, Interrupted

GROUPS = ("algo", "backbone", "dataset", "augment", "device", "experiment", "hparams_search")
_failures: list[str] = []  # runs of a sweep that failed (the sweep goes on without them)
HELD: HeldStderr | None = None  # Hydra's stderr until the task starts (see main)


def _train(cfg: DictConfig) -> float:
    from fewshot_cli.engine.run_folder import discard_if_empty
    from fewshot_cli.options import check_train

    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    try:
        check_train(cfg)  # before torch is imported: a typo costs a fraction of a second
        from fewshot_cli.train import sweeper_hook, train

        with open_dict(cfg):  # the group options chosen: names for hparams, results and errors
            cfg.choices = {g: hydra_cfg.runtime.choices.get(g) for g in GROUPS}
        hook = sweeper_hook(hydra_cfg.sweeper) if hydra_cfg.mode == RunMode.MULTIRUN else None
        return train(cfg, out, _hydra_files(cfg), on_validation=hook)
    except BaseException:
        discard_if_empty(out)  # the folder Hydra made for a run that never began
        raise


def _hydra_files(cfg: DictConfig) -> dict[str, Any]:
    """What Hydra would write into ``.hydra/``: the run's config, Hydra's, the overrides."""
    hydra_cfg = HydraConfig.get()
    return {"config.yaml": cfg, "hydra.yaml": {"hydra": hydra_cfg},
            "overrides.yaml": hydra_cfg.overrides.task}


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


COMMANDS: dict[str, tuple[Callable[[DictConfig], Any], str]] = {
    "train": (_train, "meta-train an algorithm; writes TensorBoard events, last.pt and best.pt"),
    "eval": (_eval, "test a checkpoint on fixed episodes: accuracy ± 95% CI, results.json"),
    "predict": (_predict, "classify your images with a few examples of your classes: "
                          "predictions.csv"),
    "data": (_data, "check a data set without training: splits, files, duplicates, leaks"),
    "report": (_report, "summarise a sweep folder: Markdown table, report.csv, report.png"),
}
POSITIONAL = {"report": "dir"}


def usage() -> str:
    """The top-level help: commands, config groups and their options."""
    lines = ["usage: fewshot <command> [key=value ...] [-m for a sweep] [--help]", "",
             "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
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
              "", "`fewshot train --help` shows every key and its current value."]
    return "\n".join(lines)


def quoted(value: str) -> str:
    """``value`` as a Hydra override value: quoted, so commas, spaces or '=' stay in a path."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Keys that take a path. Hydra's override grammar rejects a value holding ( ) [ ] { } = ~ & # !
# ; or a quote unless it is quoted, and Omniglot's folders are named "Old_Church_Slavonic_
# (Cyrillic)": such a path is quoted for the user (a comma still means a sweep: a,b,c).
PATH_KEYS = {"ckpt", "support", "query", "out", "resume", "init_from", "dir", "dataset.root",
             "hydra.run.dir", "hydra.sweep.dir"}
NEEDS_QUOTES = set("()[]{}=~&#!;\\'\"")


def quote_paths(args: list[str]) -> list[str]:
    """``args`` with the values of path keys quoted where Hydra's grammar needs it."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") in PATH_KEYS and value and value[0] not in "'\"" and \
                "," not in value and NEEDS_QUOTES & set(value):
            arg = f"{key}={quoted(value)}"
        out.append(arg)
    return out


def _fail(message: str, code: int) -> None:
    """Print the one sentence (under torchrun, rank 0 alone speaks) and exit with ``code``."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fewshot: error: {message}", file=sys.stderr)
    sys.exit(code)


def one_sentence(err: BaseException) -> tuple[str, int] | None:
    """The message and exit status for an error a user can cause, or None for a bug."""
    from fewshot_cli.files import os_error_in

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, FewshotError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return str(cause), 130 if isinstance(cause, Interrupted) else 1
    system = os_error_in(err)
    if system is not None:
        where = f" {system.filename}" if system.filename else ""
        return f"could not use{where}: {system.strerror}; free some space or check its " \
               "permissions, then try again", 1
    if isinstance(err, MemoryError):
        return "out of memory; lower train.meta_batch, eval.batch or the image size", 1
    return None


class SweepRunFailed(CompactHydraException):
    """A run of a sweep that failed: Hydra records it as failed and goes on with the others
    (Optuna counts it against ``hydra.sweeper.max_failure_rate``), then prints this one line."""


class Guarded:
    """Runs a command's task; our errors become one sentence and a non-zero exit. In a sweep a
    failed run prints its sentence and the sweep goes on without it (see SweepRunFailed).

    A top-level class holding a top-level function, so that launchers that run the task in
    other processes (joblib, submitit) can pickle it; what Hydra printed before the task is
    held in the module's ``HELD`` of the process that composed the config.
    """

    def __init__(self, task: Callable[[DictConfig], Any]) -> None:
        self.task = task

    def __call__(self, cfg: DictConfig) -> Any:
        if HELD is not None:
            HELD.release()
        try:
            return self.task(cfg)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as err:
            known = one_sentence(err)
            if known is None:
                raise
            message, code = known
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                from fewshot_cli.engine.run_folder import record_failed_run

                print(f"fewshot: error: {message}", file=sys.stderr)
                _failures.append(message)
                if self.task is _train:
                    record_failed_run(Path(HydraConfig.get().runtime.output_dir),
                                      _hydra_files(cfg), message)
                raise SweepRunFailed(f"fewshot: error: a run of the sweep failed: {message}") \
                    from None
            _fail(message, code)


class HeldStderr:
    """Holds back what Hydra writes to stderr until the task starts, so that a composition
    error (an unknown key, a missing option) can be replaced by one sentence."""

    def __init__(self) -> None:
        self.real, self.buffer, self.released = sys.stderr, io.StringIO(), False

    def __enter__(self) -> HeldStderr:
        sys.stderr = self.buffer
        return self

    def release(self) -> None:
        if not self.released:
            self.released = True
            sys.stderr = self.real
            self.real.write(self.buffer.getvalue())

    def __exit__(self, *exc: object) -> None:
        if not self.released:
            sys.stderr = self.real

    def text(self) -> str:
        return self.buffer.getvalue()


def condense(text: str, command: str) -> str:
    """One sentence for what Hydra printed when composing the config failed."""
    help_hint = f"see fewshot {command} --help"
    if m := re.search(r"Could not find '([\w/]+)/([^']+)'\s+Available options in '[^']+':"
                      r"((?:\n\t\S+)+)", text):
        group, option, options = m.group(1), m.group(2), m.group(3).split()
        return f"{group}={option} is not an option; choose one of: {', '.join(options)}"
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        return f"{key} is not a key of this config ({help_hint}); to add a new key write " \
               f"+{key}=..."
    if m := re.search(r"Could not (?:append to|delete from) config\. '?([^'\s.]+(?:\.\S+)?)", text):
        return f"{m.group(1).rstrip('.')}: cannot add or delete this key ({help_hint})"
    if "override_grammar" in text:  # the override parser's errors end with this link
        m = re.search(r"Error parsing override '([^']*)'", text)
        what = f"the override '{m.group(1)}'" if m else "an override"
        return f"cannot read {what}: write key=value, or key=a,b,c with -m for a sweep " \
               f"({help_hint})"
    if m := re.search(r"Error merging override (\S+)\n(.+)", text):
        return f"{m.group(1)}: {m.group(2).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and
             "HYDRA_FULL_ERROR" not in line and not line.startswith(("Traceback", "File "))]
    return (lines[-1] if lines else "the config could not be composed") + f" ({help_hint})"


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

    from fewshot_cli.engine.checkpoint import load_checkpoint
    from fewshot_cli.train import train

    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as err:
        raise FewshotError(f"cannot read the overrides {' '.join(args)} ({err}); write "
                           "key=value") from None
    path = Path(str(next(o.value() for o in overrides if o.key_or_group == "resume")))
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
            cfg.device = OmegaConf.load(_group_file("device", str(o.value())))
        elif OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise FewshotError(f"resume cannot change {o.input_line}: the run's config has no "
                               f"{key}")
        else:
            OmegaConf.update(cfg, key, o.value(), merge=False)
    _check_latest(path, state)
    cfg.resume = str(path)
    logging.getLogger(__name__).info("resuming %s at step %d%s", path, state["step"],
                                     f" with {' '.join(args[1:])}" if len(args) > 1 else "")
    return train(cfg, path.expanduser().resolve().parent, state=state)


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
                               f"{newer}, and resuming would overwrite it; resume={last}")


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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fewshot`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], quote_paths(argv[1:])
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)} "
              "(see fewshot --help)", 2)
    global HELD
    held = HELD = HeldStderr()
    if command == "train" and _resuming(rest) and not {"-h", "--help"} & set(rest):
        if {"-m", "--multirun"} & set(rest):
            _fail("resume= continues one run; it cannot be part of a sweep (-m)", 2)
        _console_logging()
        Guarded(lambda _: resume(rest))(OmegaConf.create())
        return
    from fewshot_cli.engine.run_folder import claim_new_dir

    OmegaConf.register_new_resolver("fewshot.new_dir", claim_new_dir, use_cache=True,
                                    replace=True)
    task, _ = COMMANDS[command]
    if command in POSITIONAL and rest and (Path(rest[0]).exists() or (
            "=" not in rest[0] and not rest[0].startswith("-"))):  # sweep folders hold '='
        rest = [f"{POSITIONAL[command]}={quoted(rest[0])}", *rest[1:]]
    sys.argv = [f"fewshot {command}", *rest]
    app = hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")
    try:
        with held:
            app(Guarded(task))()
    except SystemExit as done:
        if done.code not in (0, None) and not held.released:
            _fail(condense(held.text(), command), 2)
        raise
    if not held.released:
        sys.stderr.write(held.text())
    if _failures:
        _fail(f"{len(_failures)} run(s) of the sweep failed (see above)", 1)


if __name__ == "__main__":
    main()
