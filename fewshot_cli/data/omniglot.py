"""Omniglot (Lake et al. 2015) from the official release, as zips or extracted folders.

The release has four sources, each ``<name>/<Alphabet>/<characterNN>/<drawer>_<nn>.png`` (20
drawers per character, 105x105 px): ``images_background`` (30 alphabets, 964 characters),
``images_evaluation`` (20 alphabets, 659 characters) and the two small background subsets
``images_background_small1`` / ``images_background_small2``. A source is read from the folder
``root/<name>`` or, failing that, straight out of ``root/<name>.zip``. Each source is decoded once
per image size and cached; a class is named ``<source>/<Alphabet>/<characterNN>``.

Splits (``dataset.split``):

* ``vinyals`` — Vinyals et al. 2016, as shipped by Snell et al.'s prototypical-networks repo
  (``data/omniglot/splits/vinyals/*.txt``) and torchmeta (``assets/omniglot/*.json``): over all
  1623 characters, val = the 172 characters of five background alphabets (Armenian, Bengali,
  Early_Aramaic, Hebrew, Mkhedruli_(Georgian)), test = the last 423 characters of
  ``images_evaluation`` in sorted (alphabet, character) order (Gurmukhi/character42 to ULOG),
  train = the other 1028 (25 background alphabets + evaluation up to Gurmukhi/character41).
* ``vinyals_trainval`` — Snell et al.'s second stage: train on Vinyals et al.'s train and val
  characters together (1200, the authors' ``trainval.txt``), for as many steps as early stopping
  chose in a first run on ``vinyals``; val is the same 172 characters (seen in training: by
  design, its figure says nothing of new classes), test the same 423.
* ``lake`` — train on all 30 ``images_background`` alphabets; as in Koch et al. 2015, the 20
  ``images_evaluation`` alphabets are halved in sorted order: val = the first 10 (Angelic ...
  Keble), test = the last 10 (Malayalam ... ULOG).
* ``minimal`` — train on ``images_background_small1`` (5 alphabets, 136 characters); val and
  test are the SAME 106 characters: the alphabets of ``images_background_small2`` that small1
  lacks (Japanese_(katakana), Sanskrit, Tagalog), so only the two small zips are needed.
* ``lake_minimal`` — the Omniglot challenge's "minimal" setting (Lake et al. 2019): train on
  ``images_background_small1`` only, val = the same 106 background characters as ``minimal``
  (hyperparameters are chosen on background alphabets only), test = all 20 ``images_evaluation``
  alphabets (659 characters), which give the final figure only.
* ``custom`` — ``dataset.alphabets: {train: [...], val: [...], test: [...]}``, alphabet names
  looked up in the sources present (the full sets first, then small1, small2).

Training rotations (``dataset.rotations``) make each rotation of a train character a class; the
duplicate checks hash the source images before rotation, so a symmetric character's rotations
are not duplicates of each other.
Every class carries its alphabet as its group and every image its drawer (``<charindex>_<drawer>
.png``), for Lake et al.'s within-alphabet protocol (``eval.within_group``,
``eval.distinct_drawers``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.data.base import SPLITS, FewShotDataset
from fewshot_cli.data.download import download_checked
from fewshot_cli.data.images import RESAMPLE, decode_files, fingerprint
from fewshot_cli.data.store import (
    ClassStore,
    cache_file,
    cached_store,
    quarter_turns,
    unrotated,
)
from fewshot_cli.errors import FewshotError

log = logging.getLogger(__name__)

# Official zips and their md5 (the first two as in torchvision.datasets.Omniglot).
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
FULL = ("images_background", "images_evaluation")
VINYALS_VAL = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST = 423  # the last characters of images_evaluation in sorted order
# A fix that works in every command (train, resume, eval, data)...
FIX = "set dataset.root=<the folder that holds the release>"
# ...and one for data missing altogether, which fewshot eval and a resume report before any
# download (fewshot_cli.data.splits), so it is seen only by fewshot train and fewshot data.
OFFLINE = f"{FIX} or use dataset=glyphs"


def _alphabet(name: str) -> str:
    return name.split("/")[1]


@dataclass
class Source:
    """One part of the release on disk: a folder or a zip, and its characters' image files."""

    name: str
    path: Path
    is_zip: bool
    files: dict[str, list[str]]  # class name -> image paths (relative to folder / zip members)

    @staticmethod
    def open(root: Path, name: str) -> Source | None:
        """The source ``name`` under ``root`` (folder preferred over zip), or None if absent."""
        folder, archive = root / name, root / f"{name}.zip"
        if folder.is_dir():
            return Source(name, folder, False, _list_folder(folder, name))
        if archive.is_file():
            return Source(name, archive, True, _list_zip(archive, name))
        return None

    def fingerprint(self) -> str:
        """Changes when any image file is added, removed, resized or touched."""
        if self.is_zip:
            st = self.path.stat()
            return hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        files = {c: [self.path / r for r in rels] for c, rels in self.files.items()}
        return fingerprint(files, "the Omniglot image {path} is missing; restore it from the "
                           "official release under dataset.root", relative_to=self.path)

    def where(self, rel: str) -> str:
        """How the user finds one image: its path, or the zip and the member."""
        return f"{self.path}:{rel}" if self.is_zip else str(self.path / rel)


def _list_folder(folder: Path, name: str) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for alphabet in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        for char in sorted(e.name for e in os.scandir(folder / alphabet) if e.is_dir()):
            pngs = sorted(e.name for e in os.scandir(folder / alphabet / char)
                          if e.name.endswith(".png"))
            if pngs:
                files[f"{name}/{alphabet}/{char}"] = [f"{alphabet}/{char}/{p}" for p in pngs]
    return files


def _list_zip(archive: Path, name: str) -> dict[str, list[str]]:
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FewshotError(f"{archive} is not a readable zip ({e}); replace it with the official "
                           f"{archive.name} or {FIX}") from None
    files: dict[str, list[str]] = {}
    for m in sorted(members):
        parts = m.split("/")
        # <top>/<Alphabet>/<character>/<file>.png; the top folder's name does not matter
        if len(parts) == 4 and parts[3].endswith(".png") and not m.startswith("__MACOSX"):
            files.setdefault(f"{name}/{parts[1]}/{parts[2]}", []).append(m)
    return files


def _drawer(rel: str) -> int:
    """The drawer of ``<alphabet>/<character>/<charindex>_<drawer>.png``, from 0; -1 if unknown."""
    stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) - 1 if "_" in stem and tail.isdigit() else -1


def decode_source(source: Source, size: int) -> ClassStore:
    """Decode every image of ``source`` at ``size`` px into a grayscale ClassStore."""
    fix = "restore it from the official release under dataset.root"
    if source.is_zip:
        return decode_files(source.files, size, "L", archive=source.path, what="Omniglot image",
                            fix=fix)
    files = {c: [source.path / r for r in rels] for c, rels in source.files.items()}
    return decode_files(files, size, "L", what="Omniglot image", fix=fix)


def with_groups(store: ClassStore, source: Source) -> ClassStore:
    """``store`` with each class's alphabet as its group and each image's drawer."""
    drawers = torch.full(store.images.shape[:2], -1, dtype=torch.long)
    for c, name in enumerate(store.names):  # a loop over classes at load time, not per episode
        found = [_drawer(r) for r in source.files.get(name, ())]
        drawers[c, : len(found)] = torch.tensor(found, dtype=torch.long)
    return replace(store, groups=[_alphabet(n) for n in store.names], drawers=drawers)


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` into ``dest`` (tests replace this: they have no network)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)


def download(root: Path, name: str) -> Path:
    """Fetch the official ``<name>.zip`` into ``root``, check its md5, and move it in place."""
    return download_checked(URL.format(name=name), root / f"{name}.zip", MD5[name], _fetch,
                            f"Omniglot's {name}", OFFLINE)


class Omniglot(FewShotDataset):
    """Omniglot characters as classes, 20 drawings each: uint8 ``[chars, 20, 1, S, S]``."""

    rotatable = True  # a rotated character is another character (eval.rotations)

    def __init__(self, root: str, split: str = "vinyals", alphabets: dict | None = None,
                 image_size: int = 28, rotations: list[int] | tuple[int, ...] = (0,),
                 download: bool = True, allow_duplicates: bool = False) -> None:
        self.rules: dict[str, Callable[[str], list[str]]] = {
            "vinyals": self._vinyals, "vinyals_trainval": self._vinyals_trainval,
            "lake": self._lake, "minimal": self._minimal,
            "lake_minimal": self._lake_minimal, "custom": self._custom,
        }
        if split not in self.rules:
            raise FewshotError(f"dataset.split={split} is unknown; choose one of "
                               f"{', '.join(self.rules)}")
        if not isinstance(image_size, int) or image_size < 1:
            raise FewshotError(f"dataset.image_size={image_size} must be a positive integer")
        self.root = Path(os.path.expanduser(str(root)))
        self.split, self.image_size, self.download = split, image_size, bool(download)
        self.rotations = quarter_turns(rotations)
        self.alphabets = self._check_alphabets(alphabets) if split == "custom" else None
        self.allow_duplicates = bool(allow_duplicates)
        # minimal: val and test are the same characters by design; vinyals_trainval: train and val
        self.shared_splits = frozenset({("val", "test")}) if split == "minimal" else \
            frozenset({("train", "val")}) if split == "vinyals_trainval" else frozenset()
        self._sources: dict[str, Source] = {}
        self._stores: dict[str, ClassStore] = {}

    @staticmethod
    def _check_alphabets(alphabets: dict | None) -> dict[str, list[str]]:
        usage = "set dataset.alphabets={train: [...], val: [...], test: [...]}"
        if alphabets is None or any(s not in alphabets for s in SPLITS):
            raise FewshotError(f"dataset.alphabets needs alphabets for train, val and test "
                               f"when dataset.split=custom; {usage}")
        chosen = {s: [str(a) for a in alphabets[s]] for s in SPLITS}
        shared = set(chosen["train"]) & (set(chosen["val"]) | set(chosen["test"]))
        if shared:
            raise FewshotError(f"dataset.alphabets lists {', '.join(sorted(shared))} for training "
                               "and evaluation; keep the train alphabets apart from val/test")
        return chosen

    def load(self, split: str) -> ClassStore:
        """The classes of ``split`` (train/val/test); train includes the rotated copies."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        names = self.rules[self.split](split)
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.split("/")[0], []).append(n)
        store = ClassStore.concat([self._store(src).select(ns) for src, ns in groups.items()])
        return store.rotated(self.rotations) if split == "train" else store

    # ---- sources: located, downloaded when missing, decoded once per image size

    def _present(self, name: str) -> Source | None:
        if name not in self._sources:
            source = Source.open(self.root, name)
            if source is None:
                return None
            self._sources[name] = source
        return self._sources[name]

    def _source(self, name: str) -> Source:
        if self._present(name) is None:
            if not self.download:
                raise FewshotError(f"Omniglot's {name} (folder or .zip) is not in {self.root} "
                                   f"and dataset.download=false; {OFFLINE}")
            download(self.root, name)
        return self._present(name)

    def _characters(self, name: str) -> list[str]:
        """Class names of source ``name``, sorted by (alphabet, character)."""
        return list(self._source(name).files)

    def _store(self, name: str) -> ClassStore:
        if name not in self._stores:
            source = self._source(name)
            key = {"reader": "omniglot", "source": name, "image_size": self.image_size,
                   "resample": RESAMPLE, "fingerprint": source.fingerprint()}

            def build() -> ClassStore:
                log.info("decoding %s at %d px once (cached for later runs)", name,
                         self.image_size)
                return decode_source(source, self.image_size)

            store = cached_store(cache_file(self.root, key), build)
            self._stores[name] = with_groups(store, source)
        return self._stores[name]

    # ---- what the data checks ask (see FewShotDataset)

    def identity(self, name: str) -> str:
        """``<Alphabet>/<character>``: the small sets hold characters of images_background."""
        return unrotated(name).split("/", 1)[1]

    def image_path(self, split: str, name: str, index: int) -> str:
        base = unrotated(name)
        source = self._sources[base.split("/", 1)[0]]
        return source.where(source.files[base][index])

    def present(self) -> bool:
        """Every source the split reads is in dataset.root (a folder or a zip)."""
        needed = {"vinyals": FULL, "vinyals_trainval": FULL, "lake": FULL,
                  "minimal": ("images_background_small1", "images_background_small2"),
                  "lake_minimal": ("images_background_small1", "images_background_small2",
                                   "images_evaluation")}.get(self.split)
        there = lambda n: (self.root / n).is_dir() or (self.root / f"{n}.zip").is_file()
        if needed is None:  # custom: the alphabets may come from any source
            return any(there(n) for n in MD5)
        return all(there(n) for n in needed)

    def details(self) -> dict[str, Any]:
        return {"root": str(self.root), "split": self.split, "alphabets": self.alphabets,
                "rotations": self.rotations, "image_size": self.image_size}

    # ---- split rules: split -> class names

    def _vinyals(self, split: str) -> list[str]:
        if split in ("train", "val"):
            background = self._characters("images_background")
            found = {_alphabet(c) for c in background}
            missing = [a for a in VINYALS_VAL if a not in found]
            if missing:
                raise FewshotError(f"dataset.split=vinyals needs the full images_background, but "
                                   f"{', '.join(missing)} is missing under {self.root}; {FIX}")
            if split == "val":
                return [c for c in background if _alphabet(c) in VINYALS_VAL]
        evaluation = self._characters("images_evaluation")
        if len(evaluation) <= VINYALS_TEST:
            raise FewshotError(f"dataset.split=vinyals needs the full images_evaluation (659 "
                               f"characters) but {self.root} holds {len(evaluation)}; {FIX}")
        if split == "test":
            return evaluation[-VINYALS_TEST:]
        return [c for c in background if _alphabet(c) not in VINYALS_VAL] + \
            evaluation[:-VINYALS_TEST]

    def _vinyals_trainval(self, split: str) -> list[str]:
        if split == "train":
            return self._vinyals("train") + self._vinyals("val")
        return self._vinyals(split)

    def _lake(self, split: str) -> list[str]:
        if split == "train":
            return self._characters("images_background")
        evaluation = self._characters("images_evaluation")
        alphabets = sorted({_alphabet(c) for c in evaluation})
        half = set(alphabets[: len(alphabets) // 2])
        return [c for c in evaluation if (_alphabet(c) in half) == (split == "val")]

    def _minimal(self, split: str) -> list[str]:
        small1 = self._characters("images_background_small1")
        if split == "train":
            return small1
        seen = {_alphabet(c) for c in small1}
        return [c for c in self._characters("images_background_small2")
                if _alphabet(c) not in seen]

    def _lake_minimal(self, split: str) -> list[str]:
        if split == "test":
            return self._characters("images_evaluation")
        return self._minimal(split)

    def _custom(self, split: str) -> list[str]:
        present = [n for n in MD5 if self._present(n) is not None] or list(FULL)
        owner: dict[str, str] = {}  # alphabet -> first source holding it
        for name in present:
            for c in self._characters(name):
                owner.setdefault(_alphabet(c), name)
        unknown = [a for a in self.alphabets[split] if a not in owner]
        if unknown:
            raise FewshotError(f"dataset.alphabets.{split} names {', '.join(unknown)}, not found "
                               f"in {self.root}; choose from {', '.join(sorted(owner))}")
        wanted = self.alphabets[split]
        return [c for a in wanted for c in self._characters(owner[a]) if _alphabet(c) == a]
