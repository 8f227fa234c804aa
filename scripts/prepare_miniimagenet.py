"""Build miniImageNet (csv layout: ``images/`` + ``train.csv``, ``val.csv``, ``test.csv``) from
your own ILSVRC-2012 training images and Ravi & Larochelle's split files. Nothing is downloaded.

    python scripts/prepare_miniimagenet.py --imagenet /data/ILSVRC2012/train \\
        --splits /path/to/ravi-split-csvs --out ~/.cache/fewshot/miniimagenet
    fewshot train dataset=miniimagenet dataset.root=~/.cache/fewshot/miniimagenet

``--imagenet`` holds one entry per class: a folder ``<wnid>/`` of ``<wnid>_<n>.JPEG`` files (the
usual extracted layout) or the ``<wnid>.tar`` archives found inside ``ILSVRC2012_img_train.tar``.
``--splits`` holds the three csv files of https://github.com/twitter/meta-learning-lstm
(``data/miniImagenet``): rows ``filename,label`` such as ``n0153282900000005.jpg,n01532829``.
The number in a filename is the 1-based position of the image among its class's ImageNet files
sorted by their numeric id, the convention of the miniImageNet tools most papers used; each image
is squashed to ``--image-size`` px (no crop) with an area filter. Re-running skips finished images.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SPLITS = ("train", "val", "test")
RAVI = {"train": 64, "val": 16, "test": 20}
NAME = re.compile(r"^(n\d{8})(\d{8})\.jpg$")


class PrepareError(Exception):
    """Bad input: printed as one sentence, exit status 2."""


def read_splits(folder: Path) -> dict[str, dict[str, list[str]]]:
    """split -> wnid -> the csv file names of its images, checked for the expected shape."""
    splits: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        path = folder / f"{split}.csv"
        if not path.is_file():
            raise PrepareError(f"{path} is missing; pass --splits a folder holding train.csv, "
                               "val.csv and test.csv from twitter/meta-learning-lstm "
                               "(data/miniImagenet)")
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0] != "filename"]
        classes: dict[str, list[str]] = {}
        for name, label in (r[:2] for r in rows):
            match = NAME.match(name)
            if not match or match.group(1) != label:
                raise PrepareError(f"{path} has the row {name},{label}, not <wnid><8 digits>.jpg,"
                                   "<wnid>; pass the original split files with --splits")
            classes.setdefault(label, []).append(name)
        splits[split] = classes
    seen: dict[str, str] = {}
    for split, classes in splits.items():
        for wnid in classes:
            if wnid in seen:
                raise PrepareError(f"class {wnid} is in both {seen[wnid]}.csv and {split}.csv; "
                                   "pass the original split files with --splits")
            seen[wnid] = split
        if len(classes) != RAVI[split]:
            print(f"note: {split}.csv has {len(classes)} classes, not Ravi & Larochelle's "
                  f"{RAVI[split]}", file=sys.stderr)
    return splits


def class_files(imagenet: Path, wnid: str) -> tuple[Path, list[str]]:
    """The folder or tar of ``wnid`` and its image names sorted by numeric id."""
    folder, archive = imagenet / wnid, imagenet / f"{wnid}.tar"
    if folder.is_dir():
        names = [e.name for e in os.scandir(folder) if e.name.lower().endswith(".jpeg")]
        source = folder
    elif archive.is_file():
        with tarfile.open(archive) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
        source = archive
    else:
        raise PrepareError(f"class {wnid} is neither a folder nor a .tar in {imagenet}; pass "
                           "--imagenet the ILSVRC-2012 train folder")

    def number(name: str) -> int:
        digits = re.search(r"_(\d+)\.", Path(name).name)
        return int(digits.group(1)) if digits else -1

    return source, sorted(names, key=number)


def atomic_write(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def prepare_class(imagenet: str, wnid: str, wanted: list[str], out: str, size: int) -> int:
    """Write the wanted images of one class into ``out``; returns how many were written."""
    source, names = class_files(Path(imagenet), wnid)
    todo = [n for n in wanted if not (Path(out) / n).exists()]
    if not todo:
        return 0
    tar = tarfile.open(source) if source.suffix == ".tar" else None
    try:
        for name in todo:
            position = int(NAME.match(name).group(2))
            if not 1 <= position <= len(names):
                raise PrepareError(f"{name} asks for image {position} of class {wnid}, which has "
                                   f"{len(names)} images in {source}; is this the full "
                                   "ILSVRC-2012 train set?")
            member = names[position - 1]
            where = f"{source}:{member}" if tar else str(source / member)
            try:
                raw = tar.extractfile(member).read() if tar else (source / member).read_bytes()
                with Image.open(io.BytesIO(raw)) as img:
                    img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
                    img = img.convert("RGB").resize((size, size), Image.Resampling.BOX)
                    buffer = io.BytesIO()
                    img.save(buffer, format="JPEG", quality=95)
            except Exception as e:  # PIL raises OSError, SyntaxError... on bad files
                raise PrepareError(f"cannot decode {where} ({e}); restore it from the "
                                   "ILSVRC-2012 archive") from None
            atomic_write(buffer.getvalue(), Path(out) / name)
    finally:
        if tar:
            tar.close()
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--imagenet", type=Path, required=True,
                        help="ILSVRC-2012 train folder: <wnid>/ folders or <wnid>.tar files")
    parser.add_argument("--splits", type=Path, required=True,
                        help="folder with Ravi & Larochelle's train.csv, val.csv, test.csv")
    parser.add_argument("--out", type=Path, required=True, help="the new dataset.root")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else os.cpu_count())
    args = parser.parse_args(argv)
    try:
        splits = read_splits(args.splits.expanduser())
        out = args.out.expanduser()
        (out / "images").mkdir(parents=True, exist_ok=True)
        jobs = [(wnid, names) for classes in splits.values() for wnid, names in classes.items()]
        with ProcessPoolExecutor(max(1, args.workers)) as pool:
            futures = [pool.submit(prepare_class, str(args.imagenet.expanduser()), wnid, names,
                                   str(out / "images"), args.image_size)
                       for wnid, names in jobs]
            written = 0
            for i, future in enumerate(futures, 1):
                written += future.result()
                print(f"\r{i}/{len(jobs)} classes", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        for split in SPLITS:  # the csv files last: their presence marks a finished copy
            atomic_write((args.splits.expanduser() / f"{split}.csv").read_bytes(),
                         out / f"{split}.csv")
    except PrepareError as e:
        print(f"prepare_miniimagenet: error: {e}", file=sys.stderr)
        return 2
    total = sum(len(n) for _, n in jobs)
    print(f"{out}: {total} images ({written} new) in images/ with train.csv, val.csv, test.csv; "
          f"use it with: fewshot train dataset=miniimagenet dataset.root={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
