"""Every whole-number option of the config tree is bounded in options.py where it must fit (a
64-bit seed, a tensor's size), and a number past its bound is one sentence naming the key and
its range, before torch starts; fixed tasks that cannot fit in memory are refused before any is
drawn; a second SIGTERM stops any phase."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from helpers import TINY, one_sentence
from omegaconf import OmegaConf

from fewshot_cli.config import conf_dir
from fewshot_cli.errors import FewshotError
from fewshot_cli.options import RULES, SEED_MAX, SIZE_MAX, check, check_fixed_tasks

# Hydra's own settings (a launcher's, the Optuna sweeper's): their plugins check them.
HYDRA_OWN = ("hydra/",)


def whole_number_keys() -> set[str]:
    """Every key of conf/ that holds a whole number (or a list of them) in some yaml, as the
    composed config names it: ``backbone.hidden``, ``seed``, ``eval.rotations``."""
    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list) and node and all(
                isinstance(v, int) and not isinstance(v, bool) for v in node) or \
                isinstance(node, int) and not isinstance(node, bool):
            keys.add(prefix[:-1])

    for path in conf_dir().rglob("*.yaml"):
        parts = path.relative_to(conf_dir()).parts
        if str(path.relative_to(conf_dir())).startswith(HYDRA_OWN):
            continue
        config = OmegaConf.to_container(OmegaConf.load(path))
        config.pop("defaults", None)
        config.pop("hydra", None)  # Hydra's settings of a command or a search
        global_package = len(parts) == 1 or parts[0] in ("experiment", "hparams_search")
        walk(config, "" if global_package else f"{parts[0]}.")
    return keys


def bounded() -> dict[str, Any]:
    """Every rule of every command, by key."""
    return {key: rule for rules in RULES.values() for key, rule in rules.items()}


def nested(key: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``a.b``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_every_whole_number_option_of_the_config_tree_is_bounded() -> None:
    keys = whole_number_keys()
    assert {"seed", "eval.seed", "backbone.hidden", "dataset.images_per_class"} <= keys
    missing = keys - set(bounded())
    assert not missing, f"bound each of {sorted(missing)} in fewshot_cli/options.py"


@pytest.mark.parametrize("key", sorted(whole_number_keys()))
def test_a_number_past_its_bound_is_one_sentence_naming_the_key_and_its_range(key: str) -> None:
    rule = bounded()[key]
    too_big = SEED_MAX + 1 if "seed" in rule.words else SIZE_MAX + 1
    value = [too_big] if rule.kind in ("int_list", "whole") and key.endswith(
        ("rotations", "widths", "milestones")) else too_big
    with pytest.raises(FewshotError) as err:
        check(nested(key, value), {key: rule})
    assert str(err.value).startswith(f"{key}=") and rule.words in str(err.value), err.value
    assert any(w in rule.words for w in ("at most", "below", " to ")), rule.words  # the range


@pytest.mark.parametrize("override", [
    "seed=99999999999999999999", "eval.seed=99999999999999999999",
    "algo=baseline algo.finetune_seed=99999999999999999999",
    "dataset.images_per_class=99999999999999999999", "train.batch_size=99999999999999999999",
    "backbone.hidden=1e20", "backbone.hidden=99999999999999999999",
    "train.val_episodes=99999999999999999999"])
def test_a_number_that_cannot_fit_is_one_sentence_before_torch_starts(fewshot, override):
    *choices, last = override.split()
    key = last.split("=")[0]
    one_sentence(fewshot("train", *TINY, *choices, last, "train.steps=1"), f"{key}=",
                 "at most", code=1)


def test_fixed_tasks_that_cannot_fit_in_memory_are_refused_before_any_is_drawn(fewshot):
    err = one_sentence(fewshot("train", *TINY, f"train.val_episodes={SIZE_MAX}",
                               "train.steps=1"), "train.val_episodes=", "GiB", code=1)
    assert "lower train.val_episodes" in err
    fits = {"train": {"val_episodes": 200}, "eval": {"ways": 5, "shots": 1, "queries": 15}}
    check_fixed_tasks(fits, ("train.val_episodes",))  # the default fits anywhere


def test_a_second_sigterm_stops_any_phase() -> None:
    """The first SIGTERM asks for a stop at the step's end; a second one (a validation that
    never reaches it) aborts at once, as a second Ctrl-C does."""
    from fewshot_cli.engine.runtime import StopRequest

    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------- paths: ~, chdir, sweeps


def test_every_path_key_is_relative_to_the_folder_the_command_was_typed_in(tmp_path):
    """Under hydra.job.chdir=true the task runs in its run folder: every path key of every
    command (options.PATHS) is still read from the folder the command was typed in; a name
    that is no file there stays a name (backbone.weights=DEFAULT)."""
    from fewshot_cli.options import PATHS, from_launch_folder

    for command, keys in PATHS.items():
        own = [key for key in keys if not key.startswith("hydra.")]  # Hydra's: already so
        cfg = OmegaConf.create({})
        for key in own:
            OmegaConf.update(cfg, key, "data/x", force_add=True)
        from_launch_folder(command, cfg, tmp_path)
        for key in own:
            assert OmegaConf.select(cfg, key) == str(tmp_path / "data" / "x"), (command, key)
    cfg = OmegaConf.create({"backbone": {"weights": "DEFAULT"}, "dataset": {"root": "~/d"}})
    from_launch_folder("train", cfg, tmp_path)
    assert cfg.backbone.weights == "DEFAULT"
    assert cfg.dataset.root == "~/d"  # absolute: the reader expands it


def test_a_relative_dataset_root_under_chdir_is_the_one_typed(fewshot, tmp_path):
    from image_folder import make_image_folder

    make_image_folder(tmp_path / "mine", {f"c{i}": 6 for i in range(10)})
    proc = fewshot("data", "dataset=folder", "dataset.root=mine", "dataset.image_size=16",
                   "hydra.job.chdir=true", "hydra.run.dir=elsewhere")
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "mine") in proc.stdout, proc.stdout


def test_tilde_in_hydra_run_dir_is_the_home_folder(fewshot, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = fewshot("train", *TINY, "train.steps=1", "train.val_every=1", "hydra.run.dir=~/x",
                   env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert (home / "x" / "last.pt").is_file() and not (tmp_path / "~").exists()


def test_a_sweep_into_tilde_with_a_failing_run_says_why_once_and_is_reported(cli, tmp_path):
    """hydra.sweep.dir=~/sweep is the home folder's sweep, which fewshot report '~/sweep'
    finds; the run that fails prints its sentence once, without Hydra's lines after it."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    proc = cli("train", "-m", *TINY, "train.steps=1", "train.val_every=1",
               "hydra.sweep.dir=~/sweep", "train.ways=1,5", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()
              and not line.lstrip("\r").startswith("meta-train")]
    assert errors == ["fewshot: error: train.ways=1 must be a whole number of at least 2 and at "
                      f"most {SIZE_MAX} (for example train.ways=5)",
                      "fewshot: error: 1 run(s) of the sweep failed (see above)"], proc.stderr
    assert (home / "sweep" / "1" / "last.pt").is_file() and not (tmp_path / "~").exists()
    report = cli("report", "~/sweep", env=env)
    assert report.returncode == 0, report.stderr
    assert (home / "sweep" / "report.md").is_file()
