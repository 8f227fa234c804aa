"""``results.json``: the test results of one run folder, each keyed by its full protocol.

Layout: ``{"best.pt": {"<protocol in words>": entry, ...}, "last.pt": {...}}``. An entry holds
the score under its metric's name (``"metric": "accuracy", "accuracy": 0.91``), ``ci95``, the
settings that produced it, and ``protocol``: everything that changes the figure, as a
structured record (:func:`protocol`) so that readers compare records, never parse the key.
Entries written before ``protocol`` existed are read by completing their settings with the
run's own (:func:`entry_protocol`). ``fewshot eval`` merges into the file under a lock, and a
file it cannot merge into is moved aside, never lost (:func:`merge_result`); ``fewshot report``
reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fewshot_cli.data.splits import RECORD, read_record
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import MovedAside, merge_json

#: the eval.* settings that change a test's figure (eval.batch only changes its speed)
EVAL_KEYS = ("ways", "shots", "queries", "episodes", "seed", "within_group", "distinct_drawers",
             "rotations")
#: what an eval.* key of EVAL_KEYS was before configs held it (a run trained before it existed)
EVAL_DEFAULTS: dict[str, Any] = {"rotations": [0]}
#: dataset keys that say where the data lives or how it arrives, not what it is
LOCATION_KEYS = ("_target_", "root", "download")
#: how a query's score may depend on the other queries tested with it (see evaluate.py)
QUERY_STATISTICS = ("inductive", "transductive")
#: the device.* settings that change a test's figure, and fewshot eval's default for each
#: (conf/device/auto.yaml): bf16 autocast moves a figure by more than rounding. The others,
#: device.type and device.memory_format, only reorder the same fp32 arithmetic (see
#: tests/test_invariance.py, "the protocol key").
DEVICE_DEFAULTS: dict[str, Any] = {"precision": "fp32"}


def dataset_name(config: Mapping[str, Any]) -> str:
    """The data set option chosen (``glyphs``), or its class name for older configs."""
    return (config.get("choices") or {}).get("dataset") or \
        str(config["dataset"].get("_target_", "?")).rsplit(".", 1)[-1]


def classes_digest(classes: Mapping[str, Any]) -> str:
    """A digest of test classes: class name -> the fingerprint of its images' contents (a
    split of ``split.json``, or ``data.splits.fingerprints`` of a store)."""
    text = json.dumps(classes, sort_keys=True).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def recorded_test_classes(run_dir: Path) -> str | None:
    """A digest of the test classes and their images' fingerprints that the run recorded in
    its ``split.json`` (what ``dataset.root`` holds matters too: two folders of images under
    the same options are different tests); None for a run without a readable record."""
    try:
        classes = read_record(Path(run_dir) / RECORD).get("test")
    except FewshotError:
        return None
    return None if classes is None else classes_digest(classes)


def protocol(config: Mapping[str, Any], query_statistics: str | None,
             run_dir: Path | None = None, tested: Mapping[str, Any] | None = None,
             device: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that changes a test figure of a run with the plain (resolved) ``config``:
    the data set and its options (where it lives aside), the split and the test classes (the
    run in ``run_dir`` recorded them; a cross-domain test gives the fingerprints of those it
    ``tested``), the ``eval.*`` task settings, ``query_statistics`` ("inductive",
    "transductive"; None for tasks without queries) and the ``device`` settings the figure was
    computed with (None: fewshot eval's defaults, a run's own protocol; ``config``'s device is
    the one it trained on). The one place to add a new ingredient of a result's identity."""
    dataset = config["dataset"]
    classes = classes_digest(tested) if tested is not None else \
        recorded_test_classes(run_dir) if run_dir is not None else None
    return {"dataset": dataset_name(config),
            "dataset_options": {k: v for k, v in dataset.items() if k not in LOCATION_KEYS},
            "split": "test",
            "test_classes": classes,
            **{key: _plain(config["eval"].get(key, EVAL_DEFAULTS.get(key))) for key in EVAL_KEYS},
            "query_statistics": query_statistics,
            **{key: (device or {}).get(key, default) for key, default in DEVICE_DEFAULTS.items()}}


def _plain(value: Any) -> Any:
    """A list as a list (OmegaConf's ListConfig and tuples too), so protocols compare equal."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def key_words(shape: str, record: Mapping[str, Any]) -> str:
    """The entry's key in results.json: the protocol in words, e.g. ``5-way 1-shot (15
    queries), 600 episodes, seed 2024, inductive query statistics``; ``shape`` is the data
    set's description of the task shape. A cross-domain test (an entry with ``trained_on``)
    starts with its data set and test classes: ``cub test (cross-domain, classes 1f0e...):
    5-way ...``, so that tests on two data sets never share a key."""
    statistics = record.get("query_statistics")
    words = f"{shape}, {record['episodes']} episodes, seed {record['seed']}" + \
        (f", {statistics} query statistics" if statistics else "") + device_words(record)
    if record.get("trained_on"):
        classes = (record.get("protocol") or {}).get("test_classes")
        words = f"{record['dataset']} test (cross-domain, classes {classes}): {words}"
    return words


def device_words(entry: Mapping[str, Any]) -> str:
    """``", device.precision=bf16"`` for each device setting of an entry's protocol that is not
    fewshot eval's default; "" for a figure computed as by default."""
    record = entry.get("protocol") or {}
    return "".join(f", device.{key}={record[key]}" for key, default in DEVICE_DEFAULTS.items()
                   if record.get(key, default) != default)


def entry_protocol(entry: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """An entry's protocol record; for an entry written before records existed, its own
    settings completed by ``defaults`` (the protocol of the run it belongs to: such entries
    were tested on the run's data, with the model's own query statistics). An entry written
    before its device settings were recorded counts as computed with fewshot eval's default
    ones (``DEVICE_DEFAULTS``), never as whatever the entry it is compared with used."""
    stored = entry.get("protocol")
    if isinstance(stored, Mapping):
        # Tested before the run recorded its split (a resume records one): the run's classes.
        unknown = {"test_classes"} if stored.get("test_classes") is None else set()
        return {**defaults, **DEVICE_DEFAULTS,
                **{k: v for k, v in stored.items() if k not in unknown}}
    known = {key: entry[key] for key in (*EVAL_KEYS, "split") if key in entry}
    return {**defaults, **DEVICE_DEFAULTS, **known}


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _number_or_null(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def layout_problem(data: Any) -> str | None:
    """Why ``data`` (parsed JSON) is not a results.json that can be read and merged into, or
    None: an object of checkpoints, each an object of entries, each with a numeric score."""
    if not isinstance(data, dict):
        return f"it holds {_json_kind(data)} where an object of checkpoints is expected"
    for ckpt, entries in data.items():
        if not isinstance(entries, dict):
            return f'its "{ckpt}" holds {_json_kind(entries)} where an object of results is ' \
                   "expected"
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                return f'its result "{key}" of "{ckpt}" is {_json_kind(entry)}, not an object'
            metric = entry.get("metric", "accuracy")
            if not isinstance(metric, str) or not _number_or_null(entry.get(metric)) or \
                    not _number_or_null(entry.get("ci95")) or \
                    not isinstance(entry.get("protocol", {}), dict):
                return f'its result "{key}" of "{ckpt}" lacks a numeric score, its ci95 or ' \
                       "its protocol record"
    return None


def read_results(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The checkpoints' entries in ``path``; a FewshotError naming the file and what is wrong
    where it cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise FewshotError(f"{path} cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise FewshotError(f"{path} is not valid JSON ({err})") from None
    why = layout_problem(data)
    if why is not None:
        raise FewshotError(f"{path} is not a results file: {why}")
    return data


def merge_result(path: Path, ckpt: str, key: str, entry: dict[str, Any]) -> MovedAside | None:
    """Add ``entry`` under ``ckpt`` and ``key`` to the results file ``path`` under its lock,
    replacing the entry of the same protocol (whatever its key, older entries included).
    A file it cannot merge into is moved aside and a fresh one holds ``entry``; the move is
    returned. Raises OSError where the folder cannot be written."""
    record = entry["protocol"]
    own = {**record, "query_statistics": entry.get("model_query_statistics")}

    def update(data: Any) -> dict[str, Any]:
        results = data or {}
        kept = {k: e for k, e in results.get(ckpt, {}).items()
                if k != key and entry_protocol(e, own) != record}
        results[ckpt] = {**kept, key: entry}
        return results

    return merge_json(path, update, layout_problem)
