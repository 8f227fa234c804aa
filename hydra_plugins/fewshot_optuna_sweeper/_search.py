"""The search itself: ask Optuna for trials, hand their overrides to Hydra's launcher, tell
Optuna how each ended (COMPLETE, PRUNED or FAIL); and the hook a trial's run calls after each
validation, which reports the score to the study and asks the pruner whether to go on.

A trial's run may live in another process or on another machine (joblib, SLURM): it finds its
trial through the study's storage, by study name and trial number (``hydra.sweeper.trial``).
An in-memory study lives in the sweeper's process only, so there only the basic launcher's
trials (run in that process) can be pruned; a launcher with other processes needs a storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from fewshot_cli.cli import quoted
from fewshot_cli.errors import Interrupted
from hydra_plugins.fewshot_optuna_sweeper.optuna_sweeper import error

log = logging.getLogger(__name__)

PRUNERS = {"median": optuna.pruners.MedianPruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner,
           "none": optuna.pruners.NopPruner}
PRUNED_AT = "fewshot.pruned_at_step"  # user attribute set by the run's hook when it stops
RUN_DIR = "fewshot.run_dir"           # user attribute: the trial's run folder
NOT_RUN = "fewshot.not_run"           # user attribute of a trial asked past n_trials
SWEEP_MARKER = ".fewshot_search.json"  # in a sweep folder: the search whose trials it holds
SEARCH = "fewshot.search"             # study user attribute: what makes its trials one search
# Keys that do not change a trial's score (where the data are, the device, how evaluation is
# batched): a study may be continued with other values of them.
UNSCORED = ("hydra", "dataset.root", "dataset.download", "device", "eval.batch",
            "algo.batching", "algo.task_chunk", "algo.checkpoint_steps")
_STUDIES: dict[str, optuna.Study] = {}  # in-memory studies, for trials run in this process


# ---------------------------------------------------------------- options to Optuna objects


def first_line(err: BaseException) -> str:
    """The first line of an error's message: Hydra and SQLAlchemy add lines of context."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line.split(", set env var HYDRA_FULL_ERROR")[0]


def build_pruner(options: DictConfig) -> optuna.pruners.BasePruner:
    """``hydra.sweeper.pruner``: a name of ``PRUNERS`` (with ``pruner_args``) or a mapping
    with the ``_target_`` of any Optuna pruner."""
    choice, args = options.pruner, OmegaConf.to_container(options.pruner_args)
    try:
        if isinstance(choice, DictConfig):
            return instantiate(choice, **args)
        if choice not in PRUNERS:
            raise error(f"hydra.sweeper.pruner={choice} is not a pruner; choose one of "
                        f"{', '.join(PRUNERS)}, or any Optuna pruner as "
                        "{_target_: optuna.pruners.PercentilePruner, percentile: 25.0}")
        return PRUNERS[choice](**args)
    except (TypeError, ValueError) as err:
        raise error(f"hydra.sweeper.pruner_args={args} do not fit the pruner {choice} "
                    f"({first_line(err)}); "
                    "see the arguments of its class in optuna.pruners") from None


def build_sampler(options: DictConfig, trial: int = 0) -> optuna.samplers.BaseSampler:
    """``hydra.sweeper.sampler``: any Optuna sampler, ``{_target_: ..., seed: ...}``. A seeded
    sampler is seeded with ``seed + trial`` for the study's trial number ``trial``: a resumed
    study, or a second process, does not draw the first trials' values again."""
    seeded = {"seed": options.sampler.seed + trial} if options.sampler.get("seed") is not None \
        else {}
    try:
        return instantiate(options.sampler, **seeded)
    except Exception as err:  # Hydra wraps the import or argument error of the target
        raise error(f"hydra.sweeper.sampler cannot be built ({first_line(err)}); give the "
                    "_target_ of an "
                    "Optuna sampler, e.g. optuna.samplers.TPESampler, and its arguments") from None


@contextlib.contextmanager
def sqlite_lock(url: str | None) -> Iterator[None]:
    """An exclusive lock beside an SQLite database (``<file>.lock``), held by one process of
    the machine at a time: while it creates the database's tables, or counts the study's
    trials and asks the next. A no-op for other storages."""
    url = str(url or "")
    if not url.startswith("sqlite:///"):
        yield
        return
    with open(f"{url.removeprefix('sqlite:///')}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def absolute_storage(url: str | None) -> str | None:
    """A relative SQLite path (``sqlite:///study.db``) made absolute against the folder the
    command was typed in, so that trials running in their own folder (hydra.job.chdir=true)
    or process find the same database; other URLs as they are."""
    if url is None or not str(url).startswith("sqlite:///"):
        return url
    path = str(url).removeprefix("sqlite:///")
    if not path or path.startswith("/") or path.startswith(":memory:"):
        return str(url)
    return f"sqlite:///{Path(path).expanduser().absolute()}"


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """The storage at ``url`` (None: in memory). SQLite waits up to a minute for another
    process's write instead of failing at once: trials of one study write at the same time."""
    if url is None:
        return None
    try:
        if str(url).startswith("sqlite:"):
            with sqlite_lock(url):  # two processes creating one database's tables collide
                return optuna.storages.RDBStorage(str(url), engine_kwargs={
                    "connect_args": {"timeout": 60}})
        return optuna.storages.get_storage(str(url))
    except Exception as err:  # SQLAlchemy: a bad URL, a missing driver, an unreachable server
        raise error(f"hydra.sweeper.storage={url} cannot be opened ({first_line(err)}); "
                    "give a database URL such as sqlite:///study.db or "
                    "postgresql://user:password@host/db") from None


# ---------------------------------------------------------------- the search space


def distribution(override: Override, kind: type | None = None) -> BaseDistribution | None:
    """The Optuna distribution of a sweep override (``choice``, ``range``, ``interval``,
    ``tag(log, ...)``), or None for a plain ``key=value`` fixed for every trial. ``kind``: the
    type of the key's value in the config (int: ``interval`` is refused; Hydra's intervals
    are real).

    Raises:
        SearchError: a sweep that cannot mean what it says (an interval of an integer key, a
            log scale Optuna cannot give).
    """
    if not override.is_sweep_override():
        return None
    key, value = override.get_key_element(), override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        if kind is int:
            raise error(f"{key} is an integer, and interval({value.start}, {value.end}) draws "
                        f"reals; search it with range(...) or choice(...), e.g. "
                        f"{key}='range({math.ceil(value.start)}, {math.floor(value.end) + 1})'")
        return FloatDistribution(value.start, value.end, log=log_scale)
    # choice(...) and range(...): Hydra's own list of values (range excludes its stop).
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    if isinstance(value, RangeSweep) and not value.shuffle and len(choices) > 1 and all(
            isinstance(c, int) for c in choices):
        step = abs(choices[1] - choices[0])  # a descending range is the same set of values
        if log_scale and step != 1:
            raise error(f"{key}={override.input_line.partition('=')[2]}: a log scale needs "
                        "a range of step 1 (Optuna draws every integer between its ends)")
        return IntDistribution(min(choices), max(choices), step=1 if log_scale else step,
                               log=log_scale)
    if log_scale:
        raise error(f"{key}: tag(log, ...) needs interval(...) or range(...), not "
                    f"{override.input_line.partition('=')[2]}")
    return CategoricalDistribution(choices)


def search_space(options: DictConfig, arguments: Sequence[str], config: DictConfig | None = None
                 ) -> tuple[dict[str, BaseDistribution], list[str]]:
    """``hydra.sweeper.params`` and the command line's overrides: the distributions to sample,
    and the overrides every trial gets (a key fixed on the command line leaves the search).
    With the composed ``config``, each key is checked against its type and the algorithm's
    constraints (:func:`check_space`).

    Raises:
        SearchError: the space cannot be read, is empty, or asks for what a run refuses.
    """
    params = [f"{k}={v}" for k, v in (options.params or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides([*params, *arguments])
    except OverrideParseException as err:
        raise error(f"cannot read the search space ({first_line(err)}); write "
                    "hydra.sweeper.params.<key> as choice(a, b), range(1, 5), interval(0.1, 1) "
                    "or tag(log, interval(1e-4, 1e-2))") from None
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    integers = set()  # keys the space itself searches as integers, e.g. range(1, 6)
    for override in parsed[:len(params)]:
        with contextlib.suppress(Exception):
            if isinstance(distribution(override), IntDistribution):
                integers.add(override.get_key_element())
    for override in parsed:
        key = override.get_key_element()
        if key == "seed" and override.is_sweep_override():
            raise error(f"{override.input_line}: a search does not search seeds, whose scores "
                        "are replicates; search with one seed (seed=0), then train the best "
                        "settings over seeds with fewshot train -m ... seed=0,1,2")
        try:
            current = OmegaConf.select(config, key, default=None) if config is not None else None
        except Exception:  # an interpolation only a run resolves
            current = None
        kind = int if key in integers or (isinstance(current, int) and not isinstance(
            current, bool)) else None
        found = distribution(override, kind)
        if found is None:
            space.pop(key, None)
            fixed[key] = override.input_line
            if kind is int and isinstance(override.value(), float):
                raise error(f"{override.input_line}: {key} is an integer; give a whole number")
        else:
            fixed.pop(key, None)
            space[key] = found
    if not space:
        raise error("nothing to search: every key of hydra.sweeper.params is fixed on the "
                    "command line; leave one of them out, or add one with "
                    "hydra.sweeper.params.<key>='choice(a, b)'")
    if config is not None:
        check_space(config, space, fixed)
    return space, list(fixed.values())


def check_space(config: DictConfig, space: dict[str, BaseDistribution],
                fixed: dict[str, str]) -> None:
    """The algorithm's constraints over the space: an inner-loop learner (MAML's family)
    must validate with at least the inner steps it trains with (``algo.eval_inner_steps >=
    algo.inner_steps``), or half a search's trials are scored with fewer steps than they learn.

    Raises:
        SearchError: a trial of the space would break a constraint.
    """
    steps, evals = space.get("algo.inner_steps"), space.get("algo.eval_inner_steps")
    evaluated = OmegaConf.select(config, "algo.eval_inner_steps", default=None)
    if "algo.eval_inner_steps" in fixed:
        evaluated = OverridesParser.create().parse_override(fixed["algo.eval_inner_steps"]).value()
    if not isinstance(steps, IntDistribution | CategoricalDistribution) or evals is not None \
            or not isinstance(evaluated, int):
        return
    most = steps.high if isinstance(steps, IntDistribution) else max(
        c for c in steps.choices if isinstance(c, int))
    if most > evaluated:
        raise error(f"algo.inner_steps is searched up to {most} but algo.eval_inner_steps="
                    f"{evaluated}: those trials would validate with fewer inner steps than they "
                    f"train with; set algo.eval_inner_steps={most} (or more)")


def as_override(value: Any) -> str:
    """A sampled value as Hydra writes it on a command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def flat_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """A plain config as ``{"train.lr": 0.001, ...}``."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flat_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def search_identity(config: DictConfig | None, space: dict[str, BaseDistribution],
                    direction: str) -> dict[str, str]:
    """What makes trials one search, as ``{key: value}`` text (kept with the study, as its
    user attribute ``fewshot.search``): the algorithm, the data set, the metric the runs
    return, the direction, each searched key's distribution, and every other key of the run's
    config but those of ``UNSCORED``."""
    found = {"direction": direction}
    found.update({f"search space of {k}": repr(d) for k, d in sorted(space.items())})
    if config is None:
        return found
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    found.update({g: str(choices.get(g)) for g in ("algo", "dataset")})
    found["metric"] = metric_of(OmegaConf.select(config, "algo._target_", default=None))
    plain = OmegaConf.to_container(config, resolve=False)
    for key, value in sorted(flat_config(plain).items()):
        if key in space or key.startswith(tuple(f"{u}." for u in UNSCORED)) or key in UNSCORED:
            continue
        found[key] = json.dumps(value)
    return found


def metric_of(target: str | None) -> str:
    """The score an algorithm's run returns (its class's ``score_name``), accuracy by default."""
    from hydra.utils import get_class

    try:
        return str(getattr(get_class(target), "score_name", "accuracy")) if target else "?"
    except Exception:  # an algorithm that cannot be imported fails in its trial, not here
        return str(target)


def identity_differences(stored: dict[str, str], mine: dict[str, str]) -> list[str]:
    """``train.steps is 2 here but 60 in the study``, for each key on which they differ (the
    algorithm, data set, metric and direction first)."""
    first = ("algo", "dataset", "metric", "direction")
    keys = sorted({*stored, *mine}, key=lambda k: (k not in first, first.index(k)
                                                    if k in first else 0, k))
    return [f"{k} is {mine.get(k, '(unset)')} here but {stored.get(k, '(unset)')} in the study"
            for k in keys if stored.get(k) != mine.get(k)]


# ---------------------------------------------------------------- the study


class Search:
    """One invocation's share of a study: asks trials until the study holds ``n_trials``."""

    def __init__(self, options: DictConfig, launcher: Any, sweep_dir: str,
                 config: DictConfig | None = None) -> None:
        self.options, self.launcher, self.sweep_dir = options, launcher, Path(sweep_dir)
        self.config = config  # the composed config: what identifies the search
        if options.direction not in ("maximize", "minimize"):
            raise error(f"hydra.sweeper.direction={options.direction} is not a direction; "
                        "choose maximize or minimize")
        for key in ("n_trials", "n_jobs"):
            if not isinstance(options[key], int) or options[key] < 1:
                raise error(f"hydra.sweeper.{key}={options[key]} must be a positive number")
        optuna.logging.disable_default_handler()  # Optuna's lines go where Hydra's go
        optuna.logging.enable_propagation()
        self.pruner, self.sampler = build_pruner(options), build_sampler(options)
        pruning = not isinstance(self.pruner, optuna.pruners.NopPruner)
        if options.storage is None and pruning and not isinstance(launcher, BasicLauncher):
            raise error(f"pruning needs a storage that the trials' processes share, and "
                        f"{type(launcher).__name__} runs each trial in another process; add "
                        "hydra.sweeper.storage=sqlite:///study.db (a database URL across "
                        "machines), or hydra.sweeper.pruner=none")
        options.storage = absolute_storage(options.storage)  # trials may run elsewhere
        self.storage = open_storage(options.storage)
        self.job_idx = 0

    def run(self, arguments: Sequence[str]) -> None:
        space, fixed = search_space(self.options, arguments, self.config)
        identity = search_identity(self.config, space, self.options.direction)
        study = self.open_study(identity)
        self.claim_sweep_dir(study, identity)
        before = study.get_trials(deepcopy=False)
        running = [t.number for t in before if t.state == TrialState.RUNNING]
        log.info("study %s (%s): %d trials so far, asking up to n_trials=%d in all",
                 study.study_name, self.options.storage or "in memory", len(before),
                 self.options.n_trials)
        if running:
            log.warning("trials %s of study %s are RUNNING: in another process, or left so by "
                        "a search that was killed; they count towards n_trials",
                        ", ".join(map(str, running)), study.study_name)
        asked: list[optuna.Trial] = []
        failures = 0
        try:
            while batch := self.ask(study, space):
                asked = batch
                overrides = [[*fixed, *(f"{k}={as_override(v)}" for k, v in t.params.items()),
                              f"hydra.sweeper.trial={t.number}",
                              f"hydra.sweeper.study_name={quoted(study.study_name)}",
                              *([f"hydra.sweeper.storage={quoted(self.options.storage)}"]
                                if self.options.storage else [])]
                             for t in batch]
                try:
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                except Exception as err:  # a worker process died (joblib's TerminatedWorkerError)
                    log.warning("trials %s failed: their worker process died (%s); the study "
                                "goes on", ", ".join(str(t.number) for t in batch),
                                first_line(err))
                    self.fail(study, batch, f"its worker process died: {first_line(err)}")
                    self.job_idx += len(batch)
                    failures += len(batch)
                    asked = []
                    continue
                self.job_idx += len(returns)
                failed = sum(self.tell(study, t, r) for t, r in zip(batch, returns, strict=True))
                failures += failed
                asked = []
                if failed / len(batch) > self.options.max_failure_rate:
                    raise error(f"{failed} of {len(batch)} trials failed, more than "
                                f"hydra.sweeper.max_failure_rate={self.options.max_failure_rate}"
                                "; the study stopped (see the trials' errors above)")
        except KeyboardInterrupt:
            self.fail(study, asked, "interrupted")
            print("fewshot: error: interrupted; the study keeps its finished trials: run the "
                  "same command with the same storage to continue it", file=sys.stderr)
            sys.exit(130)
        except BaseException:
            self.fail(study, asked, "the search stopped")
            raise
        self.summary(study)
        from fewshot_cli import cli

        if failures and not cli._failures:  # else the CLI counts them: they ran in this process
            raise error(f"{failures} trial(s) of study {study.study_name} failed (their errors "
                        f"are in their folders' train.log: fewshot report {self.sweep_dir})")

    def open_study(self, identity: dict[str, str]) -> optuna.Study:
        """The study, new or continued; one that holds another search is refused."""
        name = self.options.study_name
        where = f"study {name} in hydra.sweeper.storage={self.options.storage}"
        try:
            with sqlite_lock(self.options.storage):
                study = optuna.create_study(storage=self.storage, study_name=name,
                                            sampler=self.sampler, pruner=self.pruner,
                                            direction=self.options.direction, load_if_exists=True)
        except ValueError as err:  # e.g. a multi-objective study of the same name
            raise error(f"{where} cannot be continued ({err}); give another "
                        "hydra.sweeper.study_name") from None
        stored_direction = study.direction.name.lower()
        if stored_direction != self.options.direction:  # Optuna 5 no longer refuses it
            raise error(f"{where} was made to {stored_direction}, not to "
                        f"hydra.sweeper.direction={self.options.direction}; continue it with "
                        f"hydra.sweeper.direction={stored_direction}, or give this search its "
                        "own hydra.sweeper.study_name")
        stored = study.user_attrs.get(SEARCH)
        if stored is None:
            if study.get_trials(deepcopy=False):
                log.warning("%s holds trials of a search fewshot did not record; it is taken "
                            "as this one from now on", where)
            study.set_user_attr(SEARCH, identity)
        elif differences := identity_differences(stored, identity):
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise error(f"{where} is another search: {'; '.join(differences[:3])}{more}; "
                        "continue it with the same settings, or give this search its own "
                        "hydra.sweeper.study_name")
        if self.storage is None:
            _STUDIES[study.study_name] = study
        return study

    def claim_sweep_dir(self, study: optuna.Study, identity: dict[str, str]) -> None:
        """Mark the sweep folder as this search's (``.fewshot_search.json``); a folder that
        holds another search's trials, or an in-memory study's (whose numbers start again at
        0), is refused before any trial runs."""
        marker = self.sweep_dir / SWEEP_MARKER
        mine = {"study_name": study.study_name, "storage": self.options.storage,
                "search": identity}
        try:
            held = json.loads(marker.read_text())
        except FileNotFoundError:
            held = None
        except (OSError, ValueError):
            held = {}
        used = held is not None or any((p / ".hydra").is_dir() for p in self.sweep_dir.glob("*"))
        if used and (held != mine or self.options.storage is None):
            what = f"study {held.get('study_name')}'s trials" if held else "runs"
            memory = "" if self.options.storage else (
                ", and an in-memory study numbers its trials from 0 again")
            raise error(f"hydra.sweep.dir={self.sweep_dir} already holds {what}{memory}; give "
                        "this search its own hydra.sweep.dir")
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(mine))

    def ask(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> list[optuna.Trial]:
        """Up to ``n_jobs`` new trials, while the study holds fewer than ``n_trials``."""
        batch = []
        for _ in range(self.options.n_jobs):
            with sqlite_lock(self.options.storage):  # one machine never asks past n_trials
                count = len(study.get_trials(deepcopy=False))
                if count >= self.options.n_trials:
                    break
                study.sampler = build_sampler(self.options, trial=count)  # its number, mostly
                trial = study.ask()
                try:
                    for key, dist in space.items():
                        trial._suggest(key, dist)
                except Exception as err:  # a space the stored trials' cannot share
                    trial.set_user_attr(NOT_RUN, f"could not be asked: {first_line(err)}")
                    study.tell(trial, state=TrialState.FAIL)  # never left RUNNING
                    raise error(f"study {study.study_name} cannot draw a trial from this "
                                f"search space ({first_line(err)}); give this search its own "
                                "hydra.sweeper.study_name") from None
            if trial.number >= self.options.n_trials:  # another machine asked meanwhile
                trial.set_user_attr(NOT_RUN, "asked past n_trials by two processes at once")
                study.tell(trial, state=TrialState.FAIL)
                break
            batch.append(trial)
        return batch

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> bool:
        """Record how the trial's run ended; True when it failed."""
        if ret.hydra_cfg is not None:
            trial.set_user_attr(RUN_DIR, str(ret.hydra_cfg.hydra.runtime.output_dir))
        if ret.status == JobStatus.FAILED:
            err = ret._return_value  # the run's exception; ret.return_value would re-raise it
            study.tell(trial, state=TrialState.FAIL)
            if interrupted(err):
                sys.exit(130)  # Ctrl-C: the run saved last.pt and said so; stop the study
            log.warning("trial %d failed: %s", trial.number,
                        first_line(err).removeprefix("fewshot: error: "))
            return True
        stored = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if PRUNED_AT in stored.user_attrs:
            study.tell(trial, state=TrialState.PRUNED)
            return False
        value = float(ret.return_value)
        study.tell(trial, value)
        return math.isnan(value)  # Optuna records a NaN as a failed trial

    def fail(self, study: optuna.Study, trials: list[optuna.Trial], why: str) -> None:
        """Mark this process's unfinished trials FAIL, so that no trial stays RUNNING."""
        for trial in trials:
            with contextlib.suppress(Exception):  # already told, or the storage is gone
                trial.set_user_attr(NOT_RUN, why)
                study.tell(trial, state=TrialState.FAIL)

    def summary(self, study: optuna.Study) -> None:
        """Log the study's counts and best trial; write optimization_results.yaml."""
        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        result: dict[str, Any] = {"name": "fewshot_optuna", "study_name": study.study_name,
                                  "storage": self.options.storage, "direction":
                                  self.options.direction, "trials": counts}
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done:
            best = study.best_trial
            run_dir = best.user_attrs.get(RUN_DIR)
            elsewhere = run_dir is not None and not Path(run_dir).resolve().is_relative_to(
                self.sweep_dir.resolve())
            result.update(best_trial=best.number, best_params=best.params, best_value=best.value,
                          best_run_dir=run_dir, best_in_this_sweep_dir=not elsewhere)
            log.info("best trial %d: %s with %s, in %s%s", best.number, best.value, best.params,
                     run_dir, " (another sweep folder: an earlier invocation of the study)"
                     if elsewhere else "")
        log.info("study %s: %s", study.study_name,
                 ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(result), self.sweep_dir / "optimization_results.yaml")


def interrupted(err: BaseException | None) -> bool:
    """Whether ``err`` (a failed run's error) came from a Ctrl-C or SIGTERM of the run."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Interrupted):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# ---------------------------------------------------------------- inside a trial's run


def trial_reporter(options: DictConfig) -> Callable[[int, float, bool], str | None] | None:
    """The run's hook for trial ``options.trial`` of study ``options.study_name``: it reports
    each validation score at its training step and, but at the run's last validation, asks the
    pruner; it returns why the run should stop, or None. None for an in-memory study of
    another process (no pruning there)."""
    if options.storage is None:
        study = _STUDIES.get(options.study_name)
        if study is None:
            return None
    else:
        study = optuna.load_study(study_name=options.study_name,
                                  storage=open_storage(options.storage),
                                  pruner=build_pruner(options))
    trial = next(optuna.Trial(study, t._trial_id) for t in study.get_trials(deepcopy=False)
                 if t.number == options.trial)
    pruner = type(study.pruner).__name__

    def report(step: int, score: float, last: bool) -> str | None:
        try:
            trial.report(score, step)
            if last or not trial.should_prune():
                return None
            trial.set_user_attr(PRUNED_AT, step)
        except Exception as err:  # the storage is gone, or the trial was ended elsewhere
            logging.getLogger("fewshot").warning(
                "could not report step %d to trial %d of study %s (%s); the run goes on",
                step, options.trial, options.study_name, err)
            return None
        return f"Optuna's {pruner} pruned trial {options.trial} of study {options.study_name}"

    return report
