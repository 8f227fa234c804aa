"""``fewshot reproduce``: the verdict logic, and the real CLI on the generated glyphs: a shortened,
changed run of a paper preset prints paper against ours with its verdicts and writes every field
of reproduction.json; a finished run is only evaluated; what cannot be reproduced is one
sentence; checkpoints record the code that trained them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import ok, one_sentence

from fewshot_cli import reproduce
from fewshot_cli.engine.checkpoint import code_version, load_checkpoint, save_checkpoint
from fewshot_cli.reproduce import figure, logged_training_seconds, verdict

# A 5-way 1-shot ProtoNet Omniglot preset run, shortened and shrunk to seconds on the glyphs.
TINY = ["experiment=protonet_omniglot_5w1s", "dataset=glyphs", "dataset.classes.train=20",
        "dataset.classes.val=20", "dataset.classes.test=20", "backbone.hidden=8",
        "train.ways=5", "train.steps=4", "train.val_every=4", "train.val_episodes=4",
        "eval.episodes=8", "device=cpu"]
RECORD_KEYS = {"preset", "cite", "run", "command", "checkpoint", "steps", "changed", "figures",
               "differences", "wall_s", "hardware", "torch", "code", "date",
               "protocol_from_preset"}


# ---------------------------------------------------------------- the verdict


@pytest.mark.parametrize("paper, ours, kind, text", [
    ({"value": 98.7, "ci95": 0.4}, {"value": 98.5, "ci95": 0.3}, "inside",
     "inside the paper's interval (ours 0.20 points below)"),
    ({"value": 98.7, "ci95": 0.4}, {"value": 98.0, "ci95": 0.5}, "overlap",
     "CIs overlap (ours 0.70 points below)"),
    ({"value": 98.8, "ci95": None}, {"value": 98.6, "ci95": 0.3}, "overlap",
     "the paper's figure is inside our CI (ours 0.20 points below)"),
    ({"value": 98.7, "ci95": 0.4}, {"value": 96.0, "ci95": 0.5}, "below",
     "below the paper by 2.70 points"),
    ({"value": 49.42, "ci95": 0.78}, {"value": 52.0, "ci95": 0.7}, "above",
     "above the paper by 2.58 points"),
    ({"value": 98.8, "ci95": None}, {"value": 98.8, "ci95": None}, "overlap",
     "the paper's figure is inside our CI (ours 0.00 points above)"),
    (None, {"value": 90.0, "ci95": 0.5}, "no paper figure", "no paper figure"),
])
def test_verdict(paper, ours, kind, text):
    found = verdict(paper, ours)
    assert (found["kind"], found["text"]) == (kind, text)


def test_a_shortened_or_changed_run_says_so_first():
    result = {"metric": "accuracy", "accuracy": 0.96, "ci95": 0.005, "episodes": 600}
    paper = {"value": 98.7, "ci95": 0.4, "read": "Table 1", "verified": True}
    row = figure("5w1s", paper, result, done=50, planned=60000)
    assert row["verdict"]["text"] == "shortened (50 of 60000 steps): below the paper by 2.70 points"
    assert row["ours"] == {"value": 96.0, "ci95": 0.5, "episodes": 600, "queries": None,
                           "seed": None}
    row = figure("5w1s", paper, result, done=60000, planned=60000, changed=["train.lr=0.01"])
    assert row["verdict"]["text"].startswith("changed from the preset (train.lr=0.01); below")
    reward = figure("k5_n10", {"value": 6.7, "ci95": None}, {"metric": "total_reward",
                    "total_reward": 6.5, "ci95": 0.1, "episodes": 1000}, 3000, 3000)
    assert reward["verdict"]["text"] == "below the paper by 0.20"


def test_training_time_of_an_older_run_is_read_from_its_log(tmp_path):
    """Each training command from its start to its last validation line: a killed command's
    steps after its last validation are made again by the next and not counted twice; a
    resume with nothing to do counts nothing."""
    log = tmp_path / "train.log"
    lines = (
        ("05:00:00", "decoding images_background at 28 px once"),
        ("05:00:10", "run folder: /runs/a"),
        ("05:10:10", "step 500: val accuracy 96.00% ± 0.60% (best ...)"),
        ("06:00:10", "step 1000: val accuracy 97.00% ± 0.50% (best ...)"),
        ("07:00:00", "resuming from step 1000 in /runs/a"),
        ("07:00:00", "run folder: /runs/a"),
        ("07:30:00", "step 1500: val accuracy 97.50% ± 0.50% (best ...)"),
        ("08:00:00", "resuming from step 1500 in /runs/a"),
        ("08:00:00", "nothing to do: the run is already at step 1500"))
    log.write_text("".join(f"[2026-11-30 {t},000][fewshot_cli.train][INFO] - {words}\n"
                           for t, words in lines))
    assert logged_training_seconds(log) == 3600 + 1800
    log.write_text("[2026-11-30 05:00:10,000][x][INFO] - run folder: /runs/a\n")
    assert logged_training_seconds(log) is None  # killed before its first validation
    assert logged_training_seconds(tmp_path / "missing.log") is None


# ---------------------------------------------------------------- the real CLI


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A run made by ``fewshot reproduce``: its folder and the command's output."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("reproduce")
    run = root / "run"
    done = ok(run_cli(["reproduce", *TINY, f"hydra.run.dir={run}"], root))
    return run, done.stdout


def test_reproduce_prints_paper_against_ours_and_records_everything(reproduced):
    run, out = reproduced
    assert "| test | paper | ours (95% CI) | episodes | verdict |" in out
    for shape, paper in (("5w1s", "98.8"), ("20w1s", "96.0")):
        assert f"| {shape} | {paper} |" in out
    assert out.count("changed from the preset (dataset=glyphs") == 2
    assert out.count("shortened (4 of 20000 steps)") == 2
    assert "at 20w1s (2 of the paper's 2 test shapes)" in out  # progress between the tests
    record = json.loads((run / "reproduction.json").read_text())
    assert set(record) == RECORD_KEYS
    assert record["preset"] == "protonet_omniglot_5w1s" and record["run"] == str(run)
    assert record["steps"] == {"done": 4, "planned": 20000}
    assert record["checkpoint"] == {"file": "best.pt", "step": 4}
    assert record["changed"][0] == "dataset=glyphs" and "train.steps=4" not in record["changed"]
    assert record["protocol_from_preset"] == {}  # the run's config holds every test setting
    assert [f["shape"] for f in record["figures"]] == ["5w1s", "20w1s"]
    for row, paper in zip(record["figures"], (98.8, 96.0), strict=True):
        assert row["paper"]["value"] == paper and row["paper"]["verified"] is True
        assert 0 <= row["ours"]["value"] <= 100 and row["ours"]["episodes"] == 8
        assert row["verdict"]["shortened"] and row["verdict"]["changed"]
    assert record["differences"] and record["cite"].startswith("Snell")
    assert record["wall_s"]["train"] > 0 and record["wall_s"]["eval"] > 0
    assert set(record["hardware"]) == {"cpu", "cores", "cores_usable", "torch_threads",
                                       "device", "gpu", "load_average"}
    assert record["hardware"]["device"] == "cpu" and record["hardware"]["gpu"] is None
    assert record["code"] == {"trained": [code_version()], "evaluated": code_version()}
    assert load_checkpoint(run / "last.pt")["code"] == [code_version()]


def test_resuming_a_finished_run_only_evaluates_it(reproduced, cli, tmp_path):
    run, _ = reproduced
    before = {name: digest(run / name) for name in ("last.pt", "best.pt")}
    done = ok(cli("reproduce", f"resume={run / 'last.pt'}"))
    assert "nothing to do" in done.stdout and "shortened (4 of 20000 steps)" in done.stdout
    assert {name: digest(run / name) for name in before} == before
    record = json.loads((run / "reproduction.json").read_text())
    assert record["command"] == f"fewshot reproduce resume={run / 'last.pt'}"
    assert record["changed"][0] == "dataset=glyphs"  # from the command that started the run
    # the run's training time, as last.pt records it, not this command's
    assert record["wall_s"]["train"] == round(load_checkpoint(run / "last.pt")["wall_seconds"], 1)
    assert not any(tmp_path.iterdir()), "the folder Hydra claimed for the command was left"


def test_what_cannot_be_reproduced_is_one_sentence(reproduced, fewshot, tmp_path):
    run, _ = reproduced
    for args in ([], ["experiment=base/protonet_omniglot"]):
        one_sentence(fewshot("reproduce", *args, "train.steps=5"), "needs experiment=NAME",
                     "protonet_omniglot_5w1s")
    one_sentence(fewshot("reproduce", "experiment=maml_omniglot_5w1s", f"resume={run / 'last.pt'}"),
                 "trained with experiment=protonet_omniglot_5w1s", "drop experiment=")
    plain = tmp_path / "plain"
    ok(fewshot("train", *TINY[1:], "train.steps=2", "train.val_every=2", f"hydra.run.dir={plain}"))
    one_sentence(fewshot("reproduce", f"resume={plain / 'last.pt'}"),
                 "was not trained from a paper preset", "fewshot eval")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_a_checkpoint_from_before_code_versions_and_figures_is_reproduced(reproduced, cli,
                                                                          tmp_path):
    """A preset's run trained before checkpoints kept the code version, the paper figures and
    eval.rotations: its code is "not recorded", its figures come from the preset it names, and
    it is tested with the preset's rotated test classes, which the record and the output say."""
    run, _ = reproduced
    old = tmp_path / "old"
    old.mkdir()
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        del state["code"], state["config"]["paper"], state["wall_seconds"]
        del state["config"]["eval"]["rotations"]
        save_checkpoint(old / name, {k: v for k, v in state.items()
                                     if k not in ("format", "version")})
    done = ok(cli("reproduce", f"resume={old / 'last.pt'}"))
    assert "tested with the preset's eval.rotations=[0,90,180,270] (the run was trained " \
        "before the key existed)" in done.stdout
    record = json.loads((old / "reproduction.json").read_text())
    assert record["protocol_from_preset"] == {"eval.rotations": [0, 90, 180, 270]}
    tested = json.loads((old / "results.json").read_text())["best.pt"].values()
    assert [e["protocol"]["rotations"] for e in tested] == [[0, 90, 180, 270]] * 2
    assert record["code"]["trained"] == "not recorded"
    assert record["wall_s"]["train"] is None  # its training time was not recorded either
    assert [f["paper"]["value"] for f in record["figures"]] == [98.8, 96.0]
    # resumed by this code: both versions, in order (and device=cpu, now auto.yaml with one key
    # changed, is composed the way Hydra composes it, not read as a file)
    ok(cli("train", f"resume={old / 'last.pt'}", "train.steps=6", "train.val_every=2",
           "device=cpu"))
    state = load_checkpoint(old / "last.pt")
    assert state["code"] == ["not recorded", code_version()]
    assert state["wall_seconds"] is None  # part of its training time is unknown
    assert state["config"]["device"] == {"type": "cpu", "precision": "fp32",
                                         "memory_format": "auto", "threads": "auto"}


def test_a_record_added_to_reproductions_shows_in_the_table(reproduced, tmp_path, monkeypatch):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import preset_table

    run, _ = reproduced
    monkeypatch.setattr(preset_table, "RECORDS", tmp_path)
    folder = preset_table.add(run)
    assert folder == tmp_path / "protonet_omniglot_5w1s"
    assert json.loads((folder / "reproduction.json").read_text())["preset"] == folder.name
    assert (folder / "validation.log").read_text().count("step 4: val accuracy") == 1
    rows = [r for r in preset_table.render().splitlines() if "`protonet_omniglot_5w1s`" in r]
    assert len(rows) == 2 and all("(8 episodes)" in r and "shortened (4 of 20000" in r
                                  for r in rows)


# ---------------------------------------------------------------- several seeds


@pytest.fixture(scope="module")
def over_seeds(tmp_path_factory):
    """``fewshot reproduce seeds=[0,1]``: its folder (one run per seed) and the output."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("seeds")
    run = root / "seeds"
    done = ok(run_cli(["reproduce", *TINY, "seeds=[0,1]", f"hydra.run.dir={run}"], root))
    return run, done.stdout


def test_reproduce_over_seeds_gives_the_t_interval_beside_each_runs(over_seeds):
    """One run per seed in seed<N>/, each recorded as a single run is; the record over them
    holds every run, and per shape the mean ± Student-t 95% CI over the runs' figures, judged
    against the paper, beside each run's interval over its episodes."""
    from fewshot_cli.intervals import student_t_ci95

    run, out = over_seeds
    assert "| test | paper | ours: mean ± t 95% CI over seeds | each seed ± 95% CI over its " \
        "episodes | episodes | verdict |" in out
    assert " reproduce experiment=protonet_omniglot_5w1s dataset=glyphs" in out
    assert f"'seeds=[0,1]' hydra.run.dir={run}" in out.split("to continue it or add seeds: ")[1]
    record = json.loads((run / "reproduction.json").read_text())
    assert set(record) == RECORD_KEYS | {"seeds", "runs"} and record["run"] == str(run)
    assert record["seeds"] == [0, 1] and record["steps"] == {"done": 4, "planned": 20000}
    for seed, each in zip((0, 1), record["runs"], strict=True):
        alone = json.loads((run / f"seed{seed}" / "reproduction.json").read_text())
        assert each == {"seed": seed, **alone}
        assert load_checkpoint(run / f"seed{seed}" / "last.pt")["config"]["seed"] == seed
    for i, row in enumerate(record["figures"]):
        runs = [each["figures"][i]["ours"] for each in record["runs"]]
        mean, half = student_t_ci95([r["value"] for r in runs])
        assert row["ours"]["runs"] == runs and all(r["ci95"] for r in runs)
        assert (row["ours"]["value"], row["ours"]["ci95"]) == (round(mean, 4), round(half, 4))
        assert row["ours"]["interval"] == "student_t_over_seeds"
        assert row["verdict"] == verdict(row["paper"], row["ours"]) | {
            "text": row["verdict"]["text"], "shortened": True, "changed": True}
        assert row["verdict"]["text"].startswith("changed from the preset (dataset=glyphs")
    assert record["wall_s"]["train"] == round(sum(r["wall_s"]["train"] for r in record["runs"]), 1)


def test_runs_of_other_settings_are_never_combined(over_seeds, fewshot, tmp_path):
    """Runs differing in steps, overrides, test protocol or preset are refused in one sentence;
    so are a bad seed list, seeds= with resume=, and continuing a seed's run with other
    settings."""
    from fewshot_cli.errors import FewshotError
    from fewshot_cli.reproduce import over_seeds as combine

    run, _ = over_seeds
    record = json.loads((run / "reproduction.json").read_text())
    a, b = record["runs"]
    for key, value, words in (("steps", {"done": 2, "planned": 20000}, "steps"),
                              ("changed", ["dataset=glyphs"], "overrides"),
                              ("preset", "maml_omniglot_5w1s", "presets")):
        with pytest.raises(FewshotError, match=f"differ in their {words}"):
            combine([a, {**b, key: value}], run, [])
    other = json.loads(json.dumps(b))
    other["figures"][0]["ours"]["episodes"] = 600
    with pytest.raises(FewshotError, match="differ in their test protocols"):
        combine([a, other], run, [])
    for seeds in ("[0,0]", "[]", "3", "[-1]"):
        one_sentence(fewshot("reproduce", *TINY, f"seeds={seeds}"), "must be a list of distinct")
    one_sentence(fewshot("reproduce", f"resume={run / 'seed0' / 'last.pt'}", "seeds=[0,1]"),
                 "seeds= and resume= do not go together")
    one_sentence(fewshot("reproduce", *TINY, "train.shots=2", "seeds=[0,1]",
                         f"hydra.run.dir={run}"), "was started with", "train.shots=2")
    moved = tmp_path / "moved" / "seed5"
    shutil.copytree(run / "seed0" / ".hydra", moved / ".hydra")
    (moved / "last.pt").touch()
    one_sentence(fewshot("reproduce", *TINY, "seeds=[5]", f"hydra.run.dir={moved.parent}"),
                 "trained with seed=0, not 5")


def test_the_same_command_continues_the_seeds_and_adds_new_ones(over_seeds, fewshot, tmp_path,
                                                              monkeypatch):
    """Rerun with its hydra.run.dir, the command only evaluates the finished seeds (their
    checkpoints untouched) and trains the new one; the table shows the record over seeds, and
    adding it to reproductions/ keeps each seed's validation lines."""
    import sys

    from conftest import REPO

    run, _ = over_seeds
    before = {seed: digest(run / f"seed{seed}" / "last.pt") for seed in (0, 1)}
    done = ok(fewshot("reproduce", *TINY, "seeds=[0,1,2]", f"hydra.run.dir={run}"))
    assert done.stdout.count("nothing to do") == 2
    assert {seed: digest(run / f"seed{seed}" / "last.pt") for seed in (0, 1)} == before
    record = json.loads((run / "reproduction.json").read_text())
    assert record["seeds"] == [0, 1, 2] and (run / "seed2" / "best.pt").exists()

    sys.path.insert(0, str(REPO / "scripts"))
    import preset_table

    monkeypatch.setattr(preset_table, "RECORDS", tmp_path / "records")
    folder = preset_table.add(run)
    assert sorted(p.name for p in folder.iterdir()) == [
        "reproduction.json", "validation.seed0.log", "validation.seed1.log", "validation.seed2.log"]
    assert (folder / "validation.seed2.log").read_text().count("step 4: val accuracy") == 1
    row = record["figures"][0]
    each = "; ".join(reproduce.shown(r, 2) for r in row["ours"]["runs"])
    assert preset_table._ours(row) == (f"{reproduce.shown(row['ours'], 2)} over 3 seeds (Student "
                                       f"t); per seed {each} (8 episodes each)")
