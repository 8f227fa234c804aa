"""fewshot's Hydra sweeper over current Optuna: search spaces in conf/hparams_search/, trials
run by any Hydra launcher, pruning on each trial's validation curve, studies shared through
Optuna's storage. Hydra imports this package's public modules when it scans for plugins, so
they import neither torch nor Optuna; the search itself is in ``_search.py``."""
