"""The sweeper's options, ``hydra.sweeper.*`` (``hydra/sweeper=fewshot_optuna``)."""

# No `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class FewshotOptunaSweeperConf:
    """Every key of ``hydra.sweeper`` with its default; README "Hyperparameter search"."""

    _target_: str = "hydra_plugins.fewshot_optuna_sweeper.optuna_sweeper.FewshotOptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built once Optuna is imported
    # maximize (an accuracy) or minimize (a loss): what the trials' runs return.
    direction: str = "maximize"
    # null: in memory, this process only; a URL shares the study between processes and machines
    # and keeps it for a later invocation: sqlite:///study.db, postgresql://user@host/db, ...
    storage: Any = None
    # The study in the storage; invocations with the same name and storage continue it.
    study_name: Any = None
    # The study's size: trials asked until the study holds this many (finished, pruned, failed
    # or running, in every process sharing it), so a resumed study runs only the rest.
    n_trials: int = 20
    # Trials asked at once and handed to the launcher together (joblib's n_jobs, SLURM's array).
    n_jobs: int = 1
    # Stop the study when more than this fraction of a batch of trials failed; 1.0: never.
    max_failure_rate: float = 1.0
    # Any Optuna sampler: {_target_: optuna.samplers.RandomSampler, seed: 0}, ...
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler",
                                                  "seed": None})
    # median | successive_halving | hyperband | none, or any Optuna pruner as
    # {_target_: optuna.pruners.PercentilePruner, percentile: 25.0}.
    pruner: Any = "median"
    # Keyword arguments of the named pruner (MedianPruner: n_startup_trials, n_warmup_steps).
    pruner_args: dict[str, Any] = field(default_factory=dict)
    # The search space: key -> choice(...), range(...), interval(...), tag(log, interval(...)).
    params: dict[str, Any] | None = None
    # Set by the sweeper on each trial's run (its number in the study); never by hand.
    trial: int | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="fewshot_optuna",
                             node=FewshotOptunaSweeperConf, provider="fewshot")
