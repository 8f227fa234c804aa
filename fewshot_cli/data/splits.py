"""Split integrity and the split record of a run.

A few-shot figure means something only if its test classes are novel and fixed. Before a run
trains, :func:`record_split` checks that no class is in two splits (by its identity: the name
without a split folder, rotation or source zip) and that no image file has an identical copy in
another split (by the content digests decoded into the cache); identical copies within one split
are reported. It then writes ``split.json`` into the run folder once: per split, each class name
and a fingerprint of its images' contents. A resumed run, and ``fewshot eval`` through
:func:`check_split`, compare the data with that record and stop with one sentence naming what
moved before anything is trained or scored. A cross-domain ``fewshot eval`` (another data set)
is compared with the record too, by content (:func:`check_unseen`): its test classes must not
be classes the run trained on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.data.base import SPLITS, FewShotDataset
from fewshot_cli.data.store import ClassStore, cache_file, user_cache_dir
from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError
from fewshot_cli.files import atomic_write_text

log = logging.getLogger(__name__)

RECORD = "split.json"
RECORD_VERSION = 2  # 1: the folder reader's list of class names per split, no fingerprints
SHOWN = 3  # examples named in a one-sentence problem
TRAIN_IMAGES = "train_images"  # the record's digests of the training images (absent before)


@dataclass
class Problem:
    """One finding of the data checks: what was found, the fix, whether it stops ``fewshot
    train``, and every case it stands for (``fewshot data`` lists them all)."""

    what: str
    stops: bool
    cases: list[str] = field(default_factory=list)
    fix: str = ""

    @property
    def sentence(self) -> str:
        """The one sentence ``fewshot train`` raises or logs: what, a few cases, the fix."""
        cases = f": {_examples(self.cases)}" if self.cases else ""
        return f"{self.what}{cases}" + (f"; {self.fix}" if self.fix else "")


def _examples(cases: list[str]) -> str:
    more = f" and {len(cases) - SHOWN} more" if len(cases) > SHOWN else ""
    return "; ".join(cases[:SHOWN]) + more


def checked(dataset: FewShotDataset) -> bool:
    """Whether ``dataset`` holds classes in splits (image data sets), which the checks cover."""
    return dataset.task_kind == IMAGE_TASKS


# ---------------------------------------------------------------- integrity


def shared_classes(dataset: FewShotDataset, names: Mapping[str, Iterable[str]]
                   ) -> list[Problem]:
    """A class (by identity) in two splits, unless the data set shares those splits on
    purpose: one Problem that stops training, a case per class."""
    where: dict[str, dict[str, str]] = {}  # identity -> split -> a class name there
    for split in SPLITS:
        for name in names.get(split, ()):
            where.setdefault(dataset.identity(name), {}).setdefault(split, name)
    cases = [f"{ident} ({', '.join(f'{name} in {split}' for split, name in found.items())})"
             for ident, found in where.items()
             if len(found) > 1 and tuple(found) not in dataset.shared_splits]
    if not cases:
        return []
    return [Problem(f"{len(cases)} class(es) are in two splits", True, cases,
                    "a class belongs to one split (a test class must be new to the model), so "
                    "move or rename one of each pair")]


def _files(dataset: FewShotDataset, stores: Mapping[str, ClassStore]
           ) -> dict[int, dict[tuple[str, int], tuple[str, str, int]]]:
    """digest -> {(class identity, image index): (split, class name, index)}: the distinct image
    files of the splits grouped by content (a rotated copy is the same file as its source)."""
    by_digest: dict[int, dict[tuple[str, int], tuple[str, str, int]]] = {}
    for split, store in stores.items():
        if store.digests is None:
            continue
        for c, (name, count) in enumerate(zip(store.names, store.counts.tolist(), strict=True)):
            ident = dataset.identity(name)
            for i, digest in enumerate(store.digests[c, :count].tolist()):
                if digest:  # 0: a file that could not be decoded
                    by_digest.setdefault(digest, {}).setdefault((ident, i), (split, name, i))
    return by_digest


def duplicates(dataset: FewShotDataset, stores: Mapping[str, ClassStore]) -> list[Problem]:
    """Image files with identical content: across splits a Problem that stops training (unless
    ``dataset.allow_duplicates``), within one split a warning."""
    across, within = [], {s: [] for s in SPLITS}
    for copies in _files(dataset, stores).values():
        if len(copies) < 2:
            continue
        found = list(copies.values())
        shown = " = ".join(f"{dataset.image_path(s, n, i)} ({s})" for s, n, i in found)
        splits = {s for s, _, _ in found}
        (across if len(splits) > 1 else within[found[0][0]]).append(shown)
    problems = []
    if across:
        problems.append(Problem(
            f"{len(across)} image(s) have an identical copy in another split",
            not dataset.allow_duplicates, across, "a test image seen in training inflates the "
            "figure, so remove one copy of each, or set dataset.allow_duplicates=true to accept "
            "them"))
    for split, cases in within.items():
        if cases:
            problems.append(Problem(
                f"{len(cases)} image(s) of the {split} split have an identical copy under "
                "another class or name", False, cases, "such a copy can be the support and the "
                "query image of one task, so remove one copy of each (or set "
                "dataset.allow_duplicates=true to keep them knowingly)"))
    return problems


def integrity_problems(dataset: FewShotDataset, stores: Mapping[str, ClassStore]
                       ) -> list[Problem]:
    """Every split-integrity problem of the loaded ``stores`` (split -> ClassStore)."""
    names = {s: store.names for s, store in stores.items()}
    return shared_classes(dataset, names) + duplicates(dataset, stores)


# ---------------------------------------------------------------- the record


def fingerprints(store: ClassStore) -> dict[str, str]:
    """Class name -> a fingerprint of its images' contents (changes with any image)."""
    out = {}
    for c, (name, count) in enumerate(zip(store.names, store.counts.tolist(), strict=True)):
        h = hashlib.blake2b(digest_size=8)
        if store.digests is not None:
            h.update(store.digests[c, :count].contiguous().numpy().tobytes())
        else:  # a store built without digests: its pixels
            h.update(store.images[c, :count].contiguous().numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def image_digests(store: ClassStore) -> torch.Tensor:
    """The distinct content digests of a store's images, sorted (long ``[N]``; none for a
    store without digests, 0 for a file that could not be decoded is left out)."""
    if store.digests is None:
        return torch.zeros(0, dtype=torch.long)
    real = torch.arange(store.digests.shape[1]) < store.counts.unsqueeze(1)
    found = store.digests[real]
    return torch.unique(found[found != 0])


def split_record(dataset: FewShotDataset, stores: Mapping[str, ClassStore]) -> dict[str, Any]:
    """What ``split.json`` holds: the reader, its split settings, per split each class's
    content fingerprint, and ``train_images``: the training images' distinct content digests
    (base64 of sorted little-endian int64), against which a cross-domain test is checked."""
    kind = type(dataset)
    record = {"version": RECORD_VERSION, "dataset": f"{kind.__module__}.{kind.__name__}",
              **dataset.details(), "left_out": dataset.left_out(),
              "splits": {s: fingerprints(store) for s, store in stores.items()}}
    if "train" in stores:
        packed = image_digests(stores["train"]).numpy().astype("<i8").tobytes()
        record[TRAIN_IMAGES] = base64.b64encode(packed).decode()
    return record


def read_record(path: Path) -> dict[str, dict[str, str | None]]:
    """Split -> {class name: fingerprint} of a ``split.json`` (None fingerprints in a record
    of version 1, which listed names only)."""
    try:
        record = json.loads(path.read_text())
        if "splits" in record:
            return {s: dict(classes) for s, classes in record["splits"].items()}
        return {s: dict.fromkeys(record[s]) for s in SPLITS if s in record}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise FewshotError(f"cannot read the split record {path} ({err}); restore it from a "
                           "backup, or move it away to go on without checking the data against "
                           "it") from None


def differences(recorded: Mapping[str, Mapping[str, str | None]],
                current: Mapping[str, Mapping[str, str]]) -> list[str]:
    """What moved between a record and the data now, for the splits in ``current``, the worst
    first: classes moved between splits, removed, added, then classes whose images changed."""
    was_in = {name: s for s, classes in recorded.items() for name in classes}
    moved, left, added, changed = [], [], [], []
    for split, now in current.items():
        then = recorded.get(split, {})
        for name in now:
            if name in then:
                if then[name] is not None and then[name] != now[name]:
                    changed.append(f"the images of {name} ({split}) changed")
            elif name in was_in:
                moved.append(f"{name} moved from {was_in[name]} to {split}")
            else:
                added.append(f"{name} was added to {split}")
        left += [f"{name} left {split}" for name in then if name not in now]
    return moved + left + added + changed


def _moved(dataset: FewShotDataset, run_dir: Path, splits: Iterable[str], fix: str) -> None:
    """Raise one sentence when the classes or images of ``splits`` differ from the record, or
    when the data no longer reads at all (the reader's own fix may name keys this command
    cannot change, so only its finding is kept)."""
    path = Path(run_dir) / RECORD
    where = f" under dataset.root={dataset.root}" if dataset.root else ""
    recorded = read_record(path)
    try:
        current = {s: fingerprints(dataset.load(s)) for s in splits}
    except FewshotError as err:
        finding = str(err).split("; ")[0]
        raise FewshotError(f"the data{where} no longer reads as this run recorded it in {path} "
                           f"({finding}); {fix}") from None
    moves = differences(recorded, current)
    if moves:
        raise FewshotError(f"the data{where} is not the data this run started with ({path}): "
                           f"{_examples(moves)}; {fix}")


def _present(dataset: FewShotDataset, command: str) -> None:
    """A run's data is read where its config says, never downloaded again into a place the
    data has left: one sentence naming the key that points to where it is now."""
    if not dataset.present():
        raise FewshotError(f"the data this run was trained on is not in dataset.root="
                           f"{dataset.root} any more (nothing was downloaded); {command} with "
                           "dataset.root=<the folder that holds it now>")


def record_split(dataset: FewShotDataset, run_dir: Path, write: bool = True,
                 resuming: bool = False) -> None:
    """At the start of ``fewshot train``: refuse a split that leaks (a class in two splits,
    identical images across splits), warn of duplicates within a split, and write
    ``split.json`` (when ``write``: rank 0). A resumed run is checked against its record
    instead (the first record is never overwritten); one from before records gets one now."""
    if not checked(dataset):
        return
    if resuming:
        _present(dataset, "resume")
    if (Path(run_dir) / RECORD).exists():
        _moved(dataset, run_dir, SPLITS, "restore it as recorded (or point dataset.root at "
               "such a copy), or start a new run on the data as it is now")
        return
    if resuming:
        log.info("%s has no %s (a run from before fewshot recorded its split): the data is "
                 "recorded as it is now", run_dir, RECORD)
    stores = {s: dataset.load(s) for s in SPLITS}
    for problem in integrity_problems(dataset, stores):
        if problem.stops:
            raise FewshotError(problem.sentence)
        if first_notice(dataset, problem.sentence):
            log.warning("%s (said once per data cache; fewshot data lists every case)",
                        problem.sentence)
        else:
            log.debug("%s", problem.sentence)
    if write:
        atomic_write_text(json.dumps(split_record(dataset, stores), indent=1) + "\n",
                          Path(run_dir) / RECORD)


def first_notice(dataset: FewShotDataset, note: str) -> bool:
    """Whether ``note`` (a warning about the data that changes no figure: a duplicate image
    within one split) is new to this data set's cache; it is remembered there from now on, so
    every later run stays quiet about it (``fewshot data`` still lists it)."""
    marker = cache_file(dataset.root or user_cache_dir(), {"reader": "noted", "note": note})
    marker = marker.with_suffix(".txt")
    if marker.exists():
        return False
    with contextlib.suppress(OSError):  # a read-only cache: say it every time
        atomic_write_text(note + "\n", marker)
    return True


def check_split(dataset: FewShotDataset, run_dir: Path, splits: Iterable[str] = ("test",)
                ) -> None:
    """Before ``fewshot eval`` scores a run: its data must be where the config says (nothing is
    downloaded) and ``splits`` must hold the classes and images its ``split.json`` records.

    A run folder without a record (from before records) is said in a log line and not checked.
    Skip this call when evaluating on another data set on purpose (cross-domain).
    """
    if not checked(dataset):
        return
    _present(dataset, "evaluate")
    if not (Path(run_dir) / RECORD).exists():
        log.info("%s has no %s (a run from before fewshot recorded its split): the test classes "
                 "are not checked against the data it was trained on", run_dir, RECORD)
        return
    _moved(dataset, run_dir, splits, "restore the data as recorded (or point dataset.root at "
           "such a copy), or train a new run on the data as it is now")


def trained_images(path: Path) -> torch.Tensor | None:
    """The training images' content digests a ``split.json`` records (sorted long ``[N]``),
    or None for a record from before they were kept."""
    try:
        packed = json.loads(Path(path).read_text()).get(TRAIN_IMAGES)
        if packed is None:
            return None
        import numpy as np

        return torch.from_numpy(np.frombuffer(base64.b64decode(packed), "<i8").copy())
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise FewshotError(f"cannot read the split record {path} ({err}); restore it from a "
                           "backup, or move it away to go on without checking the data against "
                           "it") from None


def seen_in_training(store: ClassStore, path: Path) -> torch.Tensor:
    """bool ``[classes, max_images]``: which images of ``store`` the run of the record
    ``path`` trained on, by content digest; for a record without image digests, the images
    of every class whose fingerprint is a training class's (a rotated training class has its
    source's)."""
    real = torch.arange(store.images.shape[1]) < store.counts.unsqueeze(1)
    trained = trained_images(path)
    if trained is not None and store.digests is not None:
        return torch.isin(store.digests, trained) & real & (store.digests != 0)
    classes = {f for f in read_record(path).get("train", {}).values() if f is not None}
    whole = torch.tensor([f in classes for f in fingerprints(store).values()], dtype=torch.bool)
    return real & whole.unsqueeze(1)


def check_unseen(dataset: FewShotDataset, run_dir: Path, name: str) -> None:
    """Before a cross-domain ``fewshot eval`` (``dataset=name``, another data set than the
    run's) scores: none of its test images may be an image of the run's training split, by
    content digest, as training compares its splits (:func:`seen_in_training` against the
    run's ``split.json``). Such a figure would be called cross-domain while it tests images
    the model was trained on (``dataset=omniglot_lake`` on a ``split=vinyals`` run: 236 of
    Lake's test characters are Vinyals et al.'s training characters). A run folder without a
    record is said in a log line and not checked.

    Raises:
        FewshotError: one sentence naming how many test images and classes overlap.
    """
    path = Path(run_dir) / RECORD
    if not checked(dataset):
        return
    if not path.exists():
        log.info("%s has no %s (a run from before fewshot recorded its split): the cross-domain "
                 "test images are not checked against the images it was trained on", run_dir,
                 RECORD)
        return
    store = dataset.load("test")
    seen = seen_in_training(store, path)
    if not bool(seen.any()):
        return
    classes = seen.any(dim=1).nonzero().squeeze(1).tolist()
    shown = _examples([store.names[c] for c in classes])
    raise FewshotError(
        f"{int(seen.sum())} of the {int(store.counts.sum())} test images of dataset={name}, in "
        f"{len(classes)} of its {store.num_classes} classes ({shown}), are images this run was "
        f"trained on (the train split recorded in {path}, by content), so its figure would not "
        "be cross-domain; test it on images it never saw (another data set or split), or drop "
        "dataset= to test its own test split")
