"""Hyperparameter search with fewshot's Optuna sweeper (``hydra/sweeper=fewshot_optuna``, the
``cluster`` extra): search spaces, pruning on validation curves, studies shared by processes
through their storage, resuming, and the one-sentence errors of bad search options."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import HUNG, REPO
from helpers import ADDED_KEYS, SMALL, compose, ok, one_sentence
from omegaconf import OmegaConf

from fewshot_cli.config import conf_dir
from fewshot_cli.engine.checkpoint import load_checkpoint

optuna = pytest.importorskip("optuna", minversion="4", reason="Optuna comes with the cluster "
                             "extra: pip install -e '.[dev,cluster]' (.ci/run does)")
from hydra_plugins.fewshot_optuna_sweeper._search import distribution  # noqa: E402

SPACES = sorted(p.stem for p in (conf_dir() / "hparams_search").glob("*.yaml"))
GOLDEN = REPO / "tests" / "golden" / "hparams_search"
# What composing each space gave under hydra-optuna-sweeper (tests/golden/, written before the
# change), and the differences meant: the old sweeper read range(1, 5) as 1 to 5, while Hydra's
# range, which ours follows, excludes its stop.
INTENDED = {"maml_omniglot": {"algo.inner_steps": "range(1, 6)"}}
# ... and in the run's config: MAML's trials validate with at least the inner steps they train
# with (the old space validated with 3 while searching up to 5).
INTENDED_TASK = {"maml_omniglot": {"algo.eval_inner_steps": 5}}
# A short search whose learning rate is either hopeless (1e-7: the embedding barely moves) or
# good (1e-2); ProtoNet on the glyphs, validated every 2 of 12 steps. The median pruner may
# stop a trial once 2 trials have finished, from the second validation on: at the first, random
# embeddings score about as well as trained ones (52.8% against 51.2% here), and pruning there
# stopped good trials.
BAD_OR_GOOD = ["hparams_search=protonet_omniglot", *SMALL, "train.ways=5",
               "algo.distance=sqeuclidean", "train.lr=choice(1e-7,1e-2)", "train.steps=12",
               "train.val_every=2", "+hydra.sweeper.pruner_args.n_startup_trials=2",
               "+hydra.sweeper.pruner_args.n_warmup_steps=4"]


def composed(space: str, *overrides: str):
    return compose([f"hparams_search={space}", *overrides], hydra=True)


def load(db, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


# ---------------------------------------------------------------- search spaces


@pytest.mark.parametrize("space", SPACES)
def test_each_space_composes_as_before_over_the_shared_base(space):
    """Every space is a short diff over conf/hparams_search/base/optuna.yaml and composes to
    the run config and search it composed to before, but for INTENDED."""
    cfg = composed(space)
    golden = OmegaConf.load(GOLDEN / f"{space}.yaml")
    for key, value in INTENDED_TASK.get(space, {}).items():
        OmegaConf.update(golden.task, key, value)
    task = OmegaConf.create({k: v for k, v in cfg.items() if k not in ("hydra", "choices")})
    for key in ADDED_KEYS:  # added since the golden files were written, where they lack them
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(task, parent) if parent else task
        if OmegaConf.select(golden.task, key, default="<absent>") == "<absent>" and node:
            node.pop(leaf, None)
    assert OmegaConf.to_yaml(task) == OmegaConf.to_yaml(golden.task)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("FewshotOptunaSweeper") and sweeper.pruner == "median"
    assert dict(sweeper.params) == {**golden.sweeper.params, **INTENDED.get(space, {})}
    for key in ("direction", "study_name", "n_trials", "n_jobs", "max_failure_rate"):
        assert sweeper[key] == golden.sweeper[key], key
    assert sweeper.sampler.seed == golden.sampler_seed
    assert str(cfg.hydra.mode) == golden.mode
    assert len((conf_dir() / "hparams_search" / f"{space}.yaml").read_text().splitlines()) < 30


@pytest.mark.parametrize("space", SPACES)
def test_each_searched_key_is_a_key_of_the_run(space):
    """A trial's overrides compose: every key of the space exists in the run's config, at
    both ends of its range."""
    params = composed(space).hydra.sweeper.params
    from hydra.core.override_parser.overrides_parser import OverridesParser

    dists = {o.key_or_group: distribution(o) for o in OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in params.items()])}
    for end in (0, -1):
        values = {k: d.choices[end] if hasattr(d, "choices") else (d.low, d.high)[end]
                  for k, d in dists.items()}
        cfg = composed(space, *(f"{k}={v}" for k, v in values.items()))
        for key, value in values.items():
            assert OmegaConf.select(cfg, key) == value, key


def test_hydra_sweeps_become_optuna_distributions():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = lambda text: distribution(OverridesParser.create().parse_override(text))
    assert parse("a=range(1, 6)") == optuna.distributions.IntDistribution(1, 5)
    assert parse("a=range(2, 9, 3)") == optuna.distributions.IntDistribution(2, 8, step=3)
    assert parse("a=tag(log, interval(1e-4, 1e-2))") == optuna.distributions.FloatDistribution(
        1e-4, 1e-2, log=True)
    assert parse("a=interval(1, 4)") == optuna.distributions.FloatDistribution(1.0, 4.0)
    assert parse("a=choice(true, false)").choices == (True, False)
    assert parse("a=choice(sqeuclidean, cosine)").choices == ("sqeuclidean", "cosine")
    assert parse("a=5") is None  # fixed for every trial
    # a descending range is the same values; a log tag is kept on integers
    assert parse("a=range(5, 0, -1)") == optuna.distributions.IntDistribution(1, 5)
    assert parse("a=tag(log, range(1, 100))") == optuna.distributions.IntDistribution(
        1, 99, log=True)


@pytest.mark.parametrize("space", SPACES)
def test_each_shipped_space_passes_its_algorithms_constraints(space):
    """Every shipped space, read as a search reads it (with its run's config): its keys' types
    and the algorithm's constraints (MAML: eval_inner_steps >= inner_steps) hold."""
    from hydra_plugins.fewshot_optuna_sweeper._search import search_space

    cfg = composed(space)
    found, _ = search_space(cfg.hydra.sweeper, [], cfg)
    assert set(found) == set(cfg.hydra.sweeper.params)


@pytest.mark.parametrize(("space", "args", "words"), [
    ("protonet_omniglot", ["seed=0,1,2"], ["seed=0,1,2", "replicates", "seed=0"]),
    ("maml_omniglot", ["algo.inner_steps=interval(1,5)"], ["algo.inner_steps is an integer",
                                                           "range("]),
    ("maml_omniglot", ["algo.inner_steps=3.5"], ["algo.inner_steps is an integer"]),
    ("maml_omniglot", ["algo.inner_steps=tag(log,range(1,9,2))"], ["log scale", "step 1"]),
    ("maml_omniglot", ["algo.eval_inner_steps=3"], ["searched up to 5",
                                                    "algo.eval_inner_steps=5"]),
])
def test_a_space_that_cannot_mean_what_it_says_is_one_sentence(space, args, words):
    from hydra_plugins.fewshot_optuna_sweeper._search import search_space
    from hydra_plugins.fewshot_optuna_sweeper.optuna_sweeper import SearchError

    cfg = composed(space, *(a for a in args if "(" not in a and "," not in a))
    with pytest.raises(SearchError) as refused:
        search_space(cfg.hydra.sweeper, args, cfg)
    sentence = str(refused.value)
    assert sentence.count("fewshot: error:") == 1 and "\n" not in sentence
    for word in words:
        assert word in sentence, (word, sentence)


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize(("choice", "kind"), [
    ("median", "MedianPruner"), ("successive_halving", "SuccessiveHalvingPruner"),
    ("hyperband", "HyperbandPruner"), ("none", "NopPruner"),
    ({"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0}, "PercentilePruner")])
def test_hydra_sweeper_pruner_chooses_the_pruner(choice, kind):
    from hydra_plugins.fewshot_optuna_sweeper._search import build_pruner

    options = OmegaConf.create({"pruner": choice, "pruner_args": {}})
    assert type(build_pruner(options)).__name__ == kind
    if choice == "median":  # pruner_args are the named pruner's keyword arguments
        options.pruner_args = {"n_warmup_steps": 100}
        assert build_pruner(options)._n_warmup_steps == 100



def test_a_pruner_stops_hopeless_trials_and_the_report_agrees_with_the_study(cli, tmp_path):
    """The median pruner stops trials of the hopeless learning rate at a validation: the run
    keeps its folder, last.pt at that step and its curve, the study records it PRUNED with its
    validations at their training steps, and fewshot report lists it as pruned there; the
    study's best trial is the report's best run."""
    sweep, db = tmp_path / "sweep", tmp_path / "study.db"
    out = ok(cli("train", *BAD_OR_GOOD, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep}",
                 f"hydra.sweeper.storage=sqlite:///{db}")).stdout
    trials = {t.number: t for t in load(db, "protonet_omniglot").trials}
    assert sorted(trials) == list(range(5))
    pruned = [t for t in trials.values() if t.state.name == "PRUNED"]
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert pruned and len(pruned) + len(complete) == 5, {n: t.state for n, t in trials.items()}
    assert all(t.params["train.lr"] == 1e-7 for t in pruned)
    report = ok(cli("report", str(sweep))).stdout
    for trial in pruned:
        run = sweep / str(trial.number)
        step = max(trial.intermediate_values)
        assert 4 <= step < 12 and set(trial.intermediate_values) == set(range(2, step + 1, 2))
        assert load_checkpoint(run / "last.pt")["step"] == step
        assert list(run.glob("events.out.tfevents.*")) and (run / ".hydra").is_dir()
        assert trial.user_attrs["fewshot.run_dir"] == str(run)
        assert f"- {trial.number}: pruned: at step {step} of 12 (Optuna's MedianPruner" in report
    for trial in complete:
        assert set(trial.intermediate_values) == set(range(2, 13, 2))
        best = load_checkpoint(sweep / str(trial.number) / "best.pt")["best"]["accuracy"]
        assert trial.value == pytest.approx(best)
    best = load(db, "protonet_omniglot").best_trial
    assert best.params["train.lr"] == 1e-2 and best.value > 0.5  # chance is 0.2
    assert f"best run: {best.number} (train.lr=0.01)" in report
    assert f"{100 * best.value:.2f}% ±" in report.split("best run:")[1]
    assert f"{len(complete)} complete, {len(pruned)} pruned" in out


# ---------------------------------------------------------------- shared storage


def search(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fewshot_cli", "train", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_share_one_study_and_run_each_trial_once(tmp_path):
    """Two fewshot processes given one SQLite storage and one sweep folder finish one study of
    4 trials between them: 4 trial numbers, each run once, in its own folder."""
    sweep, db = tmp_path / "sweep", tmp_path / "study.db"
    args = [*BAD_OR_GOOD, "train.steps=4", "hydra.sweeper.n_trials=4",
            f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={sweep}"]
    procs = [search([*args, f"hydra.sweeper.sampler.seed={seed}"], tmp_path) for seed in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=HUNG)
        assert proc.returncode == 0, out + err
    trials = load(db, "protonet_omniglot").trials
    assert sorted(t.number for t in trials) == list(range(4))
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [str(n) for n in range(4)]
    for trial in trials:
        run = sweep / str(trial.number)
        assert trial.user_attrs["fewshot.run_dir"] == str(run)
        assert (run / "train.log").read_text().count("run folder:") == 1  # run once
        assert load_checkpoint(run / "last.pt")["step"] == 4
    # TensorBoard names its files after the writing process: both processes ran trials.
    writers = {p.name.split(".")[-2] for p in sweep.glob("*/events.out.tfevents.*")}
    assert len(writers) == 2, writers


def test_trials_in_joblib_workers_report_their_validations_to_the_study(cli, tmp_path):
    """Trials run by joblib in worker processes find their trial in the SQLite study by name
    and number and report every validation at its step: what pruning across processes needs."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep, db = tmp_path / "sweep", tmp_path / "study.db"
    ok(cli("train", "hparams_search=protonet_omniglot", *SMALL, "train.steps=4",
           "train.val_every=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
           f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={sweep}"))
    trials = load(db, "protonet_omniglot").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        assert sorted(trial.intermediate_values) == [2, 4]
        assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
    writers = {p.name.split(".")[-2] for p in sweep.glob("*/events.out.tfevents.*")}
    assert len(writers) == 2, writers  # two worker processes ran them


def test_resuming_a_study_runs_only_the_rest(cli, tmp_path):
    """Run again with the same storage, a study continues: n_trials is the study's size, so
    n_trials=3 after 2 runs trial 2 alone, and once the study is full nothing runs."""
    db = tmp_path / "study.db"
    args = ["hparams_search=protonet_omniglot", *SMALL, "train.steps=2", "train.val_every=2",
            f"hydra.sweeper.storage=sqlite:///{db}"]
    ok(cli("train", *args, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}"))
    out = ok(cli("train", *args, "hydra.sweeper.n_trials=3",
                 f"hydra.sweep.dir={tmp_path / 'b'}")).stdout
    assert "2 trials so far" in out
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir()) == ["2"]
    trials = load(db, "protonet_omniglot").trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # the sampler went on
    # the study's best and the report agree, and say when the best lies in the first folder
    found = OmegaConf.load(tmp_path / "b" / "optimization_results.yaml")
    best = max((t for t in trials), key=lambda t: t.value)
    assert found.best_trial == best.number
    assert found.best_in_this_sweep_dir == (best.number == 2)
    report = ok(cli("report", str(tmp_path / "b"))).stdout
    assert f"best trial {best.number} (value {best.value}) is " + (
        "run 2" if best.number == 2 else f"another sweep folder: {tmp_path / 'a'}") in report
    out = ok(cli("train", *args, "hydra.sweeper.n_trials=3",
                 f"hydra.sweep.dir={tmp_path / 'c'}")).stdout
    assert "3 trials so far" in out and not list((tmp_path / "c").glob("*/last.pt"))
    assert OmegaConf.load(tmp_path / "c" / "optimization_results.yaml").trials.complete == 3


def test_ctrl_c_stops_the_study_and_leaves_no_trial_running(tmp_path):
    """Ctrl-C during a trial: its run saves last.pt and says so in one sentence, the trial is
    recorded FAIL (not left RUNNING), no further trial starts, and the exit status is 130."""
    sweep, db = tmp_path / "sweep", tmp_path / "study.db"
    proc = search(["hparams_search=protonet_omniglot", *SMALL, "train.steps=10000",
                   "train.val_every=2", "hydra.sweeper.n_trials=3",
                   f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={sweep}"], tmp_path)
    deadline = time.monotonic() + 300
    while not (sweep / "0" / "last.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the first trial never validated"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HUNG)
    assert proc.returncode == 130, out + err
    one_sentence(subprocess.CompletedProcess([], 130, out, err), "interrupted at step",
                 "last.pt")
    trials = load(db, "protonet_omniglot").trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL")]
    assert load_checkpoint(sweep / "0" / "last.pt")["step"] >= 2


# ---------------------------------------------------------------- bad search options


@pytest.mark.parametrize(("args", "words"), [
    (["hydra.sweeper.pruner=medain"], ["hydra.sweeper.pruner=medain", "median, successive"]),
    (["+hydra.sweeper.pruner_args.n_startup=3"], ["hydra.sweeper.pruner_args", "optuna.pruners"]),
    (["hydra/launcher=joblib"], ["storage=sqlite:///study.db", "pruner=none", "JoblibLauncher"]),
    (["hydra.sweeper.storage=nosuchdb://x"], ["hydra.sweeper.storage=nosuchdb://x",
                                              "sqlite:///study.db"]),
    (["train.lr=0.01", "train.ways=5", "train.queries=5", "algo.distance=cosine"],
     ["nothing to search", "hydra.sweeper.params"]),
    (["hydra.sweeper.n_trials=0"], ["hydra.sweeper.n_trials=0", "positive"]),
])
def test_a_bad_search_option_is_one_sentence(cli, tmp_path, args, words):
    if "hydra/launcher=joblib" in args:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = cli("train", "hparams_search=protonet_omniglot", *SMALL,
               f"hydra.sweep.dir={tmp_path / 'sweep'}", *args)
    one_sentence(proc, *words)
    assert not (tmp_path / "sweep").exists() or not list((tmp_path / "sweep").rglob("*.pt"))


def test_a_study_is_one_search_and_refuses_any_other(cli, tmp_path):
    """A stored study keeps what makes it one search (algorithm, data set, metric, direction,
    space, every other scored key); continuing it with anything else is refused in one
    sentence naming what differs, before any trial runs."""
    db = tmp_path / "study.db"
    args = [*SMALL, "train.ways=5", "train.val_every=2", "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=s"]
    first = ["hparams_search=protonet_omniglot", *args]
    ok(cli("train", *first, "train.steps=2", "hydra.sweeper.n_trials=1",
           f"hydra.sweep.dir={tmp_path / 'a'}"))
    refused = {  # what differs: the words its sentence must name
        "train.steps=4": ["train.steps is 4 here but 2 in the study"],
        "hydra.sweeper.direction=minimize": ["made to maximize", "direction=minimize"],
        "hparams_search=matching_omniglot": ["algo is matching here but protonet"],
        "algo.distance=choice(cosine,sqeuclidean)": ["search space of algo.distance"],
    }
    for change, words in refused.items():
        new = [change, *args, "train.steps=2"] if change.startswith("hparams_search") else [
            *first, "train.steps=2", change] if "steps" not in change else [*first, change]
        sweep = tmp_path / change.replace("=", "_").replace("(", "").replace(")", "")
        proc = cli("train", *new, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
        one_sentence(proc, "study s", "hydra.sweeper.study_name", *words, code=1)
        assert not list(sweep.glob("*/last.pt")), change
    trials = load(db, "s").trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE")]  # none RUNNING


def test_sweep_folders_hold_one_search_and_relative_storage_is_the_typed_folders(cli, tmp_path):
    """hydra.job.chdir=true runs each trial in its folder: the relative SQLite path still
    means the folder the command was typed in. A second, different search into the same
    sweep folder is refused before any trial, leaving the first one's results alone."""
    sweep = tmp_path / "sweep"
    args = ["hparams_search=protonet_omniglot", *SMALL, "train.ways=5", "train.steps=2",
            "train.val_every=2", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.storage=sqlite:///study.db", "hydra.job.chdir=true"]
    ok(cli("train", *args))
    trials = load(tmp_path / "study.db", "protonet_omniglot").trials
    assert [t.state.name for t in trials] == ["COMPLETE"]
    assert not list(sweep.rglob("study.db"))  # no empty database in a trial's folder
    results = (sweep / "optimization_results.yaml").read_text()
    proc = cli("train", *args, "hydra.sweeper.study_name=other")
    one_sentence(proc, f"hydra.sweep.dir={sweep} already holds study protonet_omniglot's",
                 "its own hydra.sweep.dir", code=1)
    assert (sweep / "optimization_results.yaml").read_text() == results
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]


def test_a_trial_whose_worker_died_is_failed_and_the_study_goes_on(tmp_path):
    """A launcher that raises for a batch (joblib when a worker process is killed) fails
    that batch's trials, never leaves them RUNNING, and the study asks the next trials; the
    search then ends in one sentence counting the failures."""
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.fewshot_optuna_sweeper._search import Search

    class DyingOnce:
        calls = 0

        def launch(self, overrides, initial_job_idx):
            DyingOnce.calls += 1
            if DyingOnce.calls == 1:
                raise RuntimeError("A worker process managed by the executor was unexpectedly "
                                   "terminated")
            done = JobReturn(status=JobStatus.COMPLETED)
            done._return_value = 0.5
            return [done for _ in overrides]

    cfg = composed("protonet_omniglot", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none",
                   f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(Exception, match="1 trial") as ended:  # SearchError (Hydra may have
        Search(cfg.hydra.sweeper, DyingOnce(), str(tmp_path / "sweep"), cfg).run([])
    assert type(ended.value).__name__ == "SearchError"  # imported its module twice)
    assert "1 trial(s) of study protonet_omniglot failed" in str(ended.value)
    states = [t.state.name for t in load(tmp_path / "study.db", "protonet_omniglot").trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
