"""results.json: locked merges that keep every concurrent update, files that cannot be merged
into moved aside (never lost, never blocking a result), entries replaced by protocol."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HUNG, run_cli
from helpers import TINY, ok

from fewshot_cli.errors import FewshotError
from fewshot_cli.files import merge_json
from fewshot_cli.results import (
    entry_protocol,
    key_words,
    layout_problem,
    merge_result,
    protocol,
    read_results,
)

RECORD = {"dataset": "glyphs", "dataset_options": {"image_size": 28}, "split": "test",
          "ways": 5, "shots": 1, "queries": 3, "episodes": 8, "seed": 2024,
          "within_group": False, "distinct_drawers": False, "query_statistics": "inductive",
          "precision": "fp32"}


def entry(score: float, **changes) -> dict:
    """A results entry as fewshot eval writes it, its protocol changed by ``changes``."""
    record = {**RECORD, **changes}
    return {"metric": "accuracy", "accuracy": score, "ci95": 0.01,
            **{k: record[k] for k in ("ways", "shots", "queries", "episodes", "seed")},
            "query_statistics": record["query_statistics"],
            "model_query_statistics": "inductive", "protocol": record}


def add(path: Path, e: dict) -> None:
    merge_result(path, "best.pt", key_words("5-way 1-shot (3 queries)", e["protocol"]), e)


def _merge_many(path: str, worker: int, count: int, start) -> None:
    start.wait()  # every process begins at once
    for i in range(count):
        merge_json(Path(path), lambda data, key=f"{worker}-{i}": {**(data or {}), key: 1})


def test_processes_merging_at_once_keep_every_update(tmp_path):
    """8 processes x 25 read-modify-writes of one file: without the lock most are lost."""
    path = tmp_path / "results.json"
    context = multiprocessing.get_context("fork")  # processes, not threads: a real race
    start = context.Barrier(8)
    workers = [context.Process(target=_merge_many, args=(str(path), w, 25, start))
               for w in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=HUNG)
        assert w.exitcode == 0
    assert len(json.loads(path.read_text())) == 200
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".results.json.*.tmp"))


# Each can be read by nobody: not JSON, the wrong JSON types, a score that is not a number.
UNMERGEABLE = {
    "not JSON": b'{"best.pt": {',
    "an array": b"[]",
    "a checkpoint holding an array": b'{"best.pt": []}',
    "an entry that is a number": b'{"best.pt": {"5-way": 5}}',
    "a score that is a string": b'{"best.pt": {"k": {"metric": "accuracy", "accuracy": "high", '
                                b'"ci95": 0.1}}}',
    "not UTF-8": b"\xff\xfe\x00{",
}


@pytest.mark.parametrize("case", UNMERGEABLE)
def test_a_file_that_cannot_be_merged_into_is_moved_aside(tmp_path, case):
    path = tmp_path / "results.json"
    path.write_bytes(UNMERGEABLE[case])
    e = entry(0.5)
    moved = merge_result(path, "best.pt", "k", e)
    assert moved is not None and moved.reason
    assert moved.to.name.startswith("results.json.corrupt-")
    assert moved.to.read_bytes() == UNMERGEABLE[case]  # kept byte for byte
    assert json.loads(path.read_text()) == {"best.pt": {"k": e}}
    with pytest.raises(FewshotError, match=str(moved.to)):
        read_results(moved.to)


def test_a_folder_in_the_way_is_moved_aside_too(tmp_path):
    (tmp_path / "results.json").mkdir()
    moved = merge_result(tmp_path / "results.json", "best.pt", "k", entry(0.5))
    assert "cannot be read" in moved.reason and moved.to.is_dir()
    assert read_results(tmp_path / "results.json")["best.pt"]["k"]["accuracy"] == 0.5


def test_layout_problems_name_where():
    assert layout_problem([]) == "it holds an array where an object of checkpoints is expected"
    assert '"best.pt" holds an array' in layout_problem({"best.pt": []})
    assert layout_problem({"best.pt": {"k": entry(0.5)}}) is None
    assert layout_problem({"best.pt": {"k": {"metric": "total_reward", "total_reward": 6.1,
                                             "ci95": None}}}) is None


def test_an_entry_is_replaced_only_by_one_of_the_same_protocol(tmp_path):
    path = tmp_path / "results.json"
    add(path, entry(0.5))
    add(path, entry(0.6, seed=7))
    add(path, entry(0.7, query_statistics="transductive"))
    add(path, entry(0.8))  # the first again: replaces it
    found = read_results(path)["best.pt"]
    assert sorted(e["accuracy"] for e in found.values()) == [0.6, 0.7, 0.8], found


def test_older_entries_without_a_protocol_record_are_read_and_replaced(tmp_path):
    """An entry written before protocol records: its key and settings only."""
    path = tmp_path / "results.json"
    legacy = {"metric": "accuracy", "accuracy": 0.4, "ci95": 0.02, "ways": 5, "shots": 1,
              "queries": 3, "episodes": 8, "seed": 2024, "within_group": False,
              "distinct_drawers": False, "split": "test", "step": 4}
    path.write_text(json.dumps({"best.pt": {"5-way 1-shot (3 queries), 8 episodes, seed 2024":
                                            legacy}}))
    assert entry_protocol(legacy, RECORD) == RECORD  # completed by the run's own protocol
    assert entry_protocol(legacy, {**RECORD, "episodes": 600}) == RECORD  # its own settings win
    add(path, entry(0.9, query_statistics="transductive"))  # another protocol: both kept
    assert len(read_results(path)["best.pt"]) == 2
    add(path, entry(0.8))  # the legacy entry's protocol: replaces it
    assert sorted(e["accuracy"] for e in read_results(path)["best.pt"].values()) == [0.8, 0.9]


def test_eight_concurrent_evaluations_keep_eight_results(tmp_path):
    """Issue 19.6: twelve fewshot eval of one checkpoint at once all said "results written",
    and 7 entries remained."""
    run = tmp_path / "run"
    ok(run_cli(["train", *TINY, "train.steps=2", "train.val_every=2",
                f"hydra.run.dir={run}"], tmp_path))
    command = [sys.executable, "-m", "fewshot_cli", "eval", f"ckpt={run / 'best.pt'}",
               "eval.episodes=2"]
    procs = [subprocess.Popen([*command, f"eval.seed={seed}"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in range(8)]
    for proc in procs:
        out, err = proc.communicate(timeout=HUNG)
        assert proc.returncode == 0, err
        assert "results written" in out
    seeds = {e["seed"] for e in read_results(run / "results.json")["best.pt"].values()}
    assert seeds == set(range(8))


def test_eval_names_the_query_statistics_and_can_test_the_other_rule(tmp_path):
    """A MAML checkpoint (algo.batchnorm=task) is tested transductively, as in Finn et al., and
    says so; eval.query_statistics=inductive tests it as fewshot predict uses it, as another
    protocol, and the report gives that test a column of its own."""
    run = tmp_path / "run"
    ok(run_cli(["train", *TINY, "algo=maml", "algo.eval_inner_steps=1", "train.steps=2",
                "train.val_every=2", f"hydra.run.dir={run}"], tmp_path))
    ckpt = f"ckpt={run / 'best.pt'}"
    own = ok(run_cli(["eval", ckpt], tmp_path)).stdout
    assert "8 episodes, transductive query statistics)" in own
    other = ok(run_cli(["eval", ckpt, "eval.query_statistics=inductive"], tmp_path)).stdout
    assert "8 episodes, inductive query statistics)" in other
    entries = read_results(run / "results.json")["best.pt"]
    assert sorted(e["query_statistics"] for e in entries.values()) == ["inductive",
                                                                       "transductive"]
    assert {e["model_query_statistics"] for e in entries.values()} == {"transductive"}
    report = ok(run_cli(["report", str(tmp_path)], tmp_path)).stdout
    assert "| test accuracy best.pt (%) | test accuracy best.pt P1 (%) |" in report
    assert "- P1: 5-way 1-shot (3 queries), 8 episodes, seed 2024, inductive query " \
           "statistics\n" in report


def test_the_test_classes_a_run_recorded_are_part_of_the_protocol(tmp_path):
    """Two folders of images under the same dataset options are different tests: the digest
    of the test classes in split.json tells them apart (None for a run without a record)."""
    config = {"dataset": {"_target_": "x.Folder", "root": "/a", "image_size": 28},
              "eval": {"ways": 5, "shots": 1}}
    assert protocol(config, "inductive", tmp_path)["test_classes"] is None
    split = {"version": 2, "splits": {"train": {"a": "1"}, "test": {"t": "aa", "u": "bb"}}}
    (tmp_path / "split.json").write_text(json.dumps(split))
    first = protocol(config, "inductive", tmp_path)
    split["splits"]["train"]["a"] = "2"  # training classes do not change the test
    (tmp_path / "split.json").write_text(json.dumps(split))
    assert protocol(config, "inductive", tmp_path) == first
    split["splits"]["test"]["u"] = "cc"  # one test class's images differ
    (tmp_path / "split.json").write_text(json.dumps(split))
    assert protocol(config, "inductive", tmp_path)["test_classes"] != first["test_classes"]
    assert protocol({**config, "dataset": {**config["dataset"], "root": "/b"}}, "inductive",
                    tmp_path)["dataset_options"] == first["dataset_options"]
    # An entry tested before its run recorded the split is read as that run's test.
    before = {"metric": "accuracy", "accuracy": 0.5, "protocol": {**first, "test_classes": None}}
    assert entry_protocol(before, first) == first
