"""The Hydra sweeper ``hydra/sweeper=fewshot_optuna``: light to import (Hydra imports it on
every start to find its plugins); Optuna is imported once a search begins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from fewshot_cli.errors import FewshotError


class SearchError(CompactHydraException):
    """A bad search option or storage: Hydra prints the message alone and exits 1."""


def error(sentence: str) -> SearchError:
    """``sentence`` as the CLI's one line, which Hydra prints before it exits 1. Until the
    first trial starts, fewshot's CLI holds stderr to condense what Hydra printed; a search's
    own sentence needs no condensing (nor the CLI's hint at --help), so it releases it."""
    from fewshot_cli import cli

    if cli.HELD is not None:
        cli.HELD.release()
    return SearchError(f"fewshot: error: {sentence}")


def _search_module(error_type: type[Exception]) -> Any:
    try:
        from hydra_plugins.fewshot_optuna_sweeper import _search
    except ImportError as err:
        message = f"hyperparameter search needs Optuna ({err}); install it with pip install " \
                  "'fewshot[cluster]'"
        raise (error(message) if error_type is SearchError else error_type(message)) from None
    return _search


class FewshotOptunaSweeper(Sweeper):
    """Runs an Optuna study: each trial is one run of the task, launched by Hydra's launcher
    (basic, joblib, submitit/SLURM); see ``config.py`` for the options."""

    def __init__(self, **options: Any) -> None:
        self.options = OmegaConf.create(options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        search = _search_module(SearchError).Search(self.options, self.launcher,
                                                    self.config.hydra.sweep.dir, self.config)
        search.run(arguments)

    @staticmethod
    def validation_hook(options: DictConfig) -> Callable[[int, float, bool], str | None] | None:
        """For a trial's run: a function of (training step, validation score, last validation)
        that reports the score to the trial and returns why the run should stop (pruned), or
        None to go on (fewshot_cli.train.ValidationHook). None outside a trial
        (``hydra.sweeper.trial`` unset)."""
        if options.get("trial") is None:
            return None
        return _search_module(FewshotError).trial_reporter(options)
