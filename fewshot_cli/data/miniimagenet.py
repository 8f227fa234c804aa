"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split, from the user's copy.

100 ImageNet classes of 600 images at 84x84: 64 train, 16 val, 20 test classes. fewshot never
downloads it (there is no official mirror); build it from ILSVRC-2012 with
``scripts/prepare_miniimagenet.py`` or point ``dataset.root`` at a copy in one of the layouts
people have, looked up per split in this order (``dataset.layout=auto``):

* ``csv`` — ``root/{train,val,test}.csv`` (``filename,label`` rows, as in Ravi & Larochelle's
  repository) and the images in ``root/images/<filename>`` or ``root/images/<label>/<filename>``;
* ``pickle`` — ``root/mini-imagenet-cache-{train,val,test}.pkl``, dicts holding ``image_data``
  (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (wnid -> image indices), as in Ren et al. 2018;
* ``folders`` — ``root/{train,val,test}/<wnid>/*.jpg`` (or ``.jpeg``/``.png``).

Each split is decoded once per image size into a uint8 ClassStore cached beside the data (or in
the user cache); later runs memory-map that file and start in seconds. Training augmentation is
the ``augment=`` group (``augment=standard``), applied by the sampler on the device.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fewshot_cli.data.base import SPLITS, FewShotDataset
from fewshot_cli.data.images import (
    PIL_MODES,
    RESAMPLE,
    array_digest,
    decode_files,
    empty_store,
    fingerprint,
    list_class_folders,
    resize_pixels,
)
from fewshot_cli.data.store import ClassStore, cache_file, cached_store
from fewshot_cli.errors import FewshotError

log = logging.getLogger(__name__)

LAYOUTS = ("csv", "pickle", "folders")
RAVI_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
EXTENSIONS = (".jpg", ".jpeg", ".png")
REBUILD = "replace it with a good copy or rebuild with scripts/prepare_miniimagenet.py"
# The numpy objects an array pickle refers to; anything else could run code, so it is refused.
PICKLE_GLOBALS = {
    (mod, name)
    for base in ("numpy.core", "numpy._core")
    for mod, name in ((f"{base}.multiarray", "_reconstruct"), (f"{base}.multiarray", "scalar"),
                      (f"{base}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def _pickle_name(split: str) -> str:
    return f"mini-imagenet-cache-{split}.pkl"


def missing_message(root: Path, split: str) -> str:
    """The one sentence shown when no layout holds ``split`` under ``root``."""
    return (f"miniImageNet's {split} split was not found under dataset.root={root}: put there "
            f"either images/ with {split}.csv, or {_pickle_name(split)}, or a {split}/<wnid>/*.jpg "
            "folder tree; fewshot never downloads miniImageNet, so build it from your ILSVRC-2012 "
            "train folder with scripts/prepare_miniimagenet.py and set dataset.root to the result")


# ---------------------------------------------------------------- listing image files


def _list_csv(csv_path: Path, images: Path) -> dict[str, list[Path]]:
    """Class (wnid) -> image paths of a Ravi & Larochelle csv, in file order."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FewshotError(f"cannot read {csv_path} ({e}); restore it from Ravi & Larochelle's "
                           "split files under dataset.root") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    bad = next((i for i, r in enumerate(rows) if len(r) < 2 or not r[0] or not r[1]), None)
    if bad is not None or not rows:
        where = f"row {bad + 2}" if bad is not None else "it has no rows"
        raise FewshotError(f"{csv_path} is not a filename,label split file ({where}); restore it "
                           "from Ravi & Larochelle's split files under dataset.root")
    # Some copies keep images/<filename>, others images/<wnid>/<filename>: decided once.
    nested = not (images / rows[0][0]).exists() and (images / rows[0][1] / rows[0][0]).exists()
    files: dict[str, list[Path]] = {}
    for name, label in rows:
        files.setdefault(label, []).append(images / label / name if nested else images / name)
    return files


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists and strings, and nothing that could run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path, size: int) -> ClassStore:
    """The ClassStore of one ``mini-imagenet-cache-<split>.pkl``, resized (when size != 84) by
    the filter that decodes the csv and folder layouts and ``fewshot predict``
    (:func:`~fewshot_cli.data.images.resize_pixels`): the same pixels, the same tensor."""
    fix = "replace it with a good copy or use another layout under dataset.root"
    try:
        import numpy  # noqa: F401  (the pickle holds numpy arrays)
    except ImportError:
        raise FewshotError(f"reading {path} needs numpy; pip install numpy, or use the csv or "
                           "folder layout under dataset.root") from None
    try:
        with open(path, "rb") as f:
            # latin1: the caches were first written by Python 2 (bytes of the array as str)
            data = _ArrayUnpickler(f, encoding="latin1").load()
        array, class_dict = data["image_data"], data["class_dict"]
    except Exception as e:
        raise FewshotError(f"{path} is not a readable miniImageNet pickle ({e}); {fix}") from None
    if getattr(array, "dtype", None) != "uint8" or array.ndim != 4 or array.shape[-1] != 3 or \
            not isinstance(class_dict, Mapping):
        raise FewshotError(f"{path} must hold image_data as uint8 [N, H, W, 3] and a class_dict; "
                           f"{fix}")
    source = torch.from_numpy(array)
    names = sorted(class_dict)
    index = [torch.as_tensor(list(class_dict[n]), dtype=torch.long) for n in names]
    if any(len(i) == 0 or int(i.min()) < 0 or int(i.max()) >= len(source) for i in index):
        raise FewshotError(f"{path} has a class_dict pointing outside image_data; {fix}")
    counts = torch.tensor([len(i) for i in index], dtype=torch.long)
    images, _ = empty_store(counts, 3, size)
    digests = torch.zeros(images.shape[:2], dtype=torch.long)
    for c, rows in enumerate(index):  # a loop over classes, each one batched op
        # digests of the source pixels, as a JPEG layout of the same images would give
        digests[c, : len(rows)] = torch.tensor([array_digest(source[r]) for r in rows.tolist()])
        images[c, : len(rows)] = resize_pixels(source[rows].permute(0, 3, 1, 2), size)
    origin = torch.tensor([PIL_MODES.index("RGB"), array.shape[2], array.shape[1], 0],
                          dtype=torch.int32).expand(*images.shape[:2], 4).clone()
    return ClassStore(images, [str(n) for n in names], counts, digests=digests, origin=origin)


# ---------------------------------------------------------------- the data set


class MiniImageNet(FewShotDataset):
    """miniImageNet classes (wnids) as a uint8 store ``[classes, 600, 3, S, S]`` per split."""

    channels = 3

    def __init__(self, root: str, image_size: int = 84, layout: str = "auto",
                 allow_duplicates: bool = False) -> None:
        if layout != "auto" and layout not in LAYOUTS:
            raise FewshotError(f"dataset.layout={layout} is unknown; choose auto, "
                               f"{', '.join(LAYOUTS)}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise FewshotError(f"dataset.image_size={image_size} must be a positive integer "
                               "(84 in the papers)")
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size, self.layout = image_size, layout
        self.allow_duplicates = bool(allow_duplicates)
        self._stores: dict[str, ClassStore] = {}
        # (split, class) -> its image files, or the pickle holding them
        self._files: dict[tuple[str, str], list[Path] | Path] = {}

    def load(self, split: str) -> ClassStore:
        """The classes of ``split`` (train/val/test), decoded once and memory-mapped after."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._stores:
            store = self._read(split)
            if store.num_classes != RAVI_CLASSES[split] or store.min_images != IMAGES_PER_CLASS:
                log.warning("the miniImageNet %s split under %s has %d classes of at least %d "
                            "images, not Ravi & Larochelle's %d of %d: results are not comparable "
                            "with published ones", split, self.root, store.num_classes,
                            store.min_images, RAVI_CLASSES[split], IMAGES_PER_CLASS)
            self._stores[split] = store
        return self._stores[split]

    def locate(self, split: str) -> tuple[str, Path]:
        """The layout holding ``split`` and its csv, pickle or folder path."""
        candidates = {
            "csv": self.root / f"{split}.csv",
            "pickle": self.root / _pickle_name(split),
            "folders": self.root / split,
        }
        found = {"csv": candidates["csv"].is_file() and (self.root / "images").is_dir(),
                 "pickle": candidates["pickle"].is_file(),
                 "folders": candidates["folders"].is_dir()}
        for layout in LAYOUTS if self.layout == "auto" else (self.layout,):
            if found[layout]:
                return layout, candidates[layout]
        if self.layout != "auto":
            others = [lay for lay in LAYOUTS if found[lay]]
            hint = f"; dataset.layout={others[0]} would find it" if others else ""
            raise FewshotError(f"{missing_message(self.root, split)}{hint} (dataset.layout="
                               f"{self.layout} is set)")
        raise FewshotError(missing_message(self.root, split))

    # ---- what the data checks ask (see FewShotDataset)

    def image_path(self, split: str, name: str, index: int) -> str:
        found = self._files.get((split, name))
        if isinstance(found, list):
            return str(found[index])
        return f"image {index + 1} of class {name}" + (f" in {found}" if found else "")

    def present(self) -> bool:
        try:
            return all(self.locate(s) for s in SPLITS)
        except FewshotError:
            return False

    def details(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "image_size": self.image_size}

    def _read(self, split: str) -> ClassStore:
        layout, path = self.locate(split)
        key = {"reader": "miniimagenet", "split": split, "layout": layout,
               "image_size": self.image_size, "resample": RESAMPLE}
        if layout == "pickle":
            st = path.stat()
            key["fingerprint"] = f"{path}:{st.st_size}:{st.st_mtime_ns}"
            build = lambda: read_pickle(path, self.image_size)
        else:
            files = _list_csv(path, self.root / "images") if layout == "csv" else \
                list_class_folders(path, EXTENSIONS)
            if not files:
                raise FewshotError(f"{path} lists no images; {missing_message(self.root, split)}")
            self._files.update({(split, n): paths for n, paths in files.items()})
            key["fingerprint"] = fingerprint(files, "the miniImageNet image {path} (class {cls}) "
                                             "is missing; restore it or rebuild the data set "
                                             "with scripts/prepare_miniimagenet.py")
            build = lambda: decode_files(files, self.image_size, "RGB",
                                         what="miniImageNet image", fix=REBUILD)

        def logged_build() -> ClassStore:
            log.info("decoding miniImageNet %s (%s layout) at %d px once; later runs read the "
                     "cache", split, layout, self.image_size)
            return build()

        store = cached_store(cache_file(self.root, key), logged_build)
        if layout == "pickle":  # its images have no files: messages name the pickle
            self._files.update(dict.fromkeys(((split, n) for n in store.names), path))
        return store


def encode_jpeg(image: torch.Tensor, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 ``[3, H, W]`` image (used by the tests and the benchmark)."""
    c, h, w = image.shape
    img = Image.frombytes("RGB", (w, h), image.permute(1, 2, 0).contiguous().numpy().tobytes())
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()
