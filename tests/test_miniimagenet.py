"""The miniImageNet reader: a tiny fake copy in each layout, the cache, bad input
and the real CLI trained and evaluated on each layout."""

from __future__ import annotations

import csv
import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ok
from PIL import Image

from fewshot_cli.data import images, miniimagenet
from fewshot_cli.data.miniimagenet import MiniImageNet, encode_jpeg
from fewshot_cli.data.splits import record_split
from fewshot_cli.errors import FewshotError

REPO = Path(__file__).resolve().parents[1]
CLASSES, IMAGES, SIZE = 5, 20, 84
SPLITS = ("train", "val", "test")
LAYOUTS = ("csv", "pickle", "folders")


def wnid(split: str, c: int) -> str:
    return f"n{SPLITS.index(split) + 1:02d}{c:06d}"


@pytest.fixture(scope="session")
def jpegs() -> dict[str, dict[str, list[bytes]]]:
    """split -> wnid -> JPEG bytes: smooth random colour images, distinct per class."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, list[bytes]]] = {}
    for split in SPLITS:
        low = torch.rand(CLASSES, 1, 3, 6, 6, generator=g) + 0.3 * torch.rand(
            CLASSES, IMAGES, 3, 6, 6, generator=g)
        big = torch.nn.functional.interpolate(low.flatten(0, 1), size=SIZE, mode="bilinear")
        pixels = (big.clamp(0, 1) * 255).to(torch.uint8).view(CLASSES, IMAGES, 3, SIZE, SIZE)
        out[split] = {wnid(split, c): [encode_jpeg(pixels[c, i]) for i in range(IMAGES)]
                      for c in range(CLASSES)}
    return out


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def filename(name: str, i: int) -> str:
    return f"{name}{i + 1:08d}.jpg"  # Ravi & Larochelle's naming


def make_copy(root: Path, layout: str, jpegs: dict) -> Path:
    """A fake miniImageNet in ``layout`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in jpegs.items():
        if layout == "csv":
            (root / "images").mkdir(exist_ok=True)
            with open(root / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["filename", "label"])
                for name, files in classes.items():
                    for i, data in enumerate(files):
                        (root / "images" / filename(name, i)).write_bytes(data)
                        w.writerow([filename(name, i), name])
        elif layout == "folders":
            for name, files in classes.items():
                (root / split / name).mkdir(parents=True)
                for i, data in enumerate(files):
                    (root / split / name / filename(name, i)).write_bytes(data)
        else:  # the pickle cache: images interleaved, as the class_dict allows
            class_dict = {name: list(range(c, CLASSES * IMAGES, CLASSES))
                          for c, name in enumerate(classes)}
            order = sorted((idx, name, i) for name in class_dict
                           for i, idx in enumerate(class_dict[name]))
            arrays = [decoded(classes[name][i]) for _, name, i in order]
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": np.stack(arrays), "class_dict": class_dict}, f,
                            protocol=4)
    return root


@pytest.fixture(params=LAYOUTS)
def copy(request, tmp_path, jpegs) -> tuple[str, Path]:
    return request.param, make_copy(tmp_path / request.param, request.param, jpegs)


def test_every_layout_reads_the_same_store(copy, jpegs):
    layout, root = copy
    ds = MiniImageNet(str(root))
    for split in SPLITS:
        assert ds.locate(split)[0] == layout
        store = ds.load(split)
        assert store.images.shape == (CLASSES, IMAGES, 3, SIZE, SIZE)
        assert store.images.dtype == torch.uint8
        assert store.names == [wnid(split, c) for c in range(CLASSES)]
        # pixel for pixel what PIL decodes from the same JPEG file, and the same digest
        first = jpegs[split][store.names[2]][7]
        assert np.array_equal(store.images[2, 7].permute(1, 2, 0).numpy(), decoded(first))
        assert store.digests[2, 7] == images._digest(Image.open(io.BytesIO(first)).convert("RGB"))


def test_second_load_is_memory_mapped_from_the_cache(copy, monkeypatch, own_cache):
    _, root = copy
    first = MiniImageNet(str(root)).load("train")
    monkeypatch.setattr(miniimagenet, "decode_files", lambda *a: pytest.fail("decoded again"))
    monkeypatch.setattr(miniimagenet, "read_pickle", lambda *a: pytest.fail("decoded again"))
    again = MiniImageNet(str(root)).load("train")
    assert torch.equal(first.images, again.images) and first.names == again.names
    assert list(own_cache.glob("miniimagenet-*.pt"))
    # an mmap-ed tensor's storage is not resizable: a quick way to see it is not in RAM
    assert not again.images.untyped_storage().resizable()


def test_other_image_size_is_resized_and_cached_apart(copy, own_cache):
    _, root = copy
    small = MiniImageNet(str(root), image_size=32).load("val")
    assert small.images.shape == (CLASSES, IMAGES, 3, 32, 32)
    assert len(list(own_cache.glob("*.pt"))) == 1


def test_nested_csv_images_and_changed_files(tmp_path, jpegs):
    root = make_copy(tmp_path / "mini", "csv", jpegs)
    for p in (root / "images").glob("*.jpg"):  # images/<wnid>/<filename>, as mmfewshot keeps them
        (p.parent / p.name[:9]).mkdir(exist_ok=True)
        p.rename(p.parent / p.name[:9] / p.name)
    store = MiniImageNet(str(root)).load("test")
    assert store.images.shape[:2] == (CLASSES, IMAGES)
    victim = root / "images" / wnid("test", 0) / filename(wnid("test", 0), 0)
    victim.write_bytes(jpegs["test"][wnid("test", 1)][0])  # a changed file: a new cache
    again = MiniImageNet(str(root)).load("test")
    assert torch.equal(again.images[0, 0], again.images[1, 0])


def test_missing_data_says_where_to_get_it(tmp_path):
    with pytest.raises(FewshotError) as e:
        MiniImageNet(str(tmp_path / "nothing")).load("train")
    msg = str(e.value)
    for word in ("dataset.root=", "train.csv", "mini-imagenet-cache-train.pkl", "train/<wnid>",
                 "scripts/prepare_miniimagenet.py", "never downloads"):
        assert word in msg, word
    assert "\n" not in msg


def test_forced_layout_points_at_the_one_present(tmp_path, jpegs):
    root = make_copy(tmp_path / "mini", "folders", jpegs)
    with pytest.raises(FewshotError, match="dataset.layout=folders would find it"):
        MiniImageNet(str(root), layout="csv").load("val")


def test_corrupt_jpeg_is_named(tmp_path, jpegs, own_cache):
    root = make_copy(tmp_path / "mini", "folders", jpegs)
    bad = root / "val" / wnid("val", 3) / filename(wnid("val", 3), 4)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    with pytest.raises(FewshotError, match=f"cannot decode the miniImageNet image {bad}"):
        MiniImageNet(str(root)).load("val")
    assert not list(own_cache.glob("*.pt")), "a cache of a broken split was kept"


def test_missing_listed_file_and_broken_csv_are_named(tmp_path, jpegs):
    root = make_copy(tmp_path / "mini", "csv", jpegs)
    gone = root / "images" / filename(wnid("train", 1), 3)
    gone.unlink()
    with pytest.raises(FewshotError, match=f"image {gone} .class {wnid('train', 1)}. is missing"):
        MiniImageNet(str(root)).load("train")
    (root / "val.csv").write_text("filename,label\nonly-one-column\n")
    with pytest.raises(FewshotError, match="val.csv is not a filename,label split file"):
        MiniImageNet(str(root)).load("val")


def test_bad_pickles_are_refused(tmp_path, jpegs):
    root = make_copy(tmp_path / "mini", "pickle", jpegs)
    path = root / "mini-imagenet-cache-test.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FewshotError, match="is not a readable miniImageNet pickle"):
        MiniImageNet(str(root)).load("test")
    # a pickle that would run code when loaded is refused, not run
    path.write_bytes(pickle.dumps({"image_data": os.system, "class_dict": {}}))
    with pytest.raises(FewshotError, match="refers to posix.system"):
        MiniImageNet(str(root)).load("test")
    with open(path, "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [5]}},
                    f)
    with pytest.raises(FewshotError, match="class_dict pointing outside image_data"):
        MiniImageNet(str(root)).load("test")


def test_a_class_in_two_split_files_is_refused(tmp_path, jpegs):
    root = make_copy(tmp_path / "mini", "csv", jpegs)
    leaked = wnid("train", 0)
    with open(root / "test.csv", "a", newline="") as f:  # a train class listed for testing too
        csv.writer(f).writerow([filename(leaked, 3), leaked])
    with pytest.raises(FewshotError, match=rf"1 class\(es\) are in two splits: {leaked} "
                                           rf"\({leaked} in train, {leaked} in test\)"):
        record_split(MiniImageNet(str(root)), tmp_path / "run")


@pytest.mark.parametrize("layout", ["folders", "pickle"])
def test_an_image_in_two_splits_is_refused_in_every_layout(tmp_path, jpegs, layout):
    root = make_copy(tmp_path / "mini", layout, jpegs)
    train, test = wnid("train", 1), wnid("test", 2)
    if layout == "folders":
        copied = root / "test" / test / filename(test, 5)
        copied.write_bytes((root / "train" / train / filename(train, 0)).read_bytes())
        where = (f"{root / 'train' / train / filename(train, 0)} (train) = {copied} (test)")
    else:  # the same pixels in both pickles
        pickles = {s: root / f"mini-imagenet-cache-{s}.pkl" for s in ("train", "test")}
        data = {s: pickle.loads(p.read_bytes()) for s, p in pickles.items()}
        source = data["train"]["image_data"][data["train"]["class_dict"][train][0]]
        data["test"]["image_data"][data["test"]["class_dict"][test][5]] = source
        pickles["test"].write_bytes(pickle.dumps(data["test"], protocol=4))
        where = (f"image 1 of class {train} in {pickles['train']} (train) = image 6 of class "
                 f"{test} in {pickles['test']} (test)")
    with pytest.raises(FewshotError) as err:
        record_split(MiniImageNet(str(root)), tmp_path / "run")
    assert str(err.value).startswith(f"1 image(s) have an identical copy in another split: "
                                     f"{where}; "), str(err.value)
    record_split(MiniImageNet(str(root), allow_duplicates=True), tmp_path / "run")


def test_bad_config_values_name_the_key():
    with pytest.raises(FewshotError, match="dataset.layout=zip"):
        MiniImageNet("x", layout="zip")
    with pytest.raises(FewshotError, match="dataset.image_size=0"):
        MiniImageNet("x", image_size=0)


# ---------------------------------------------------------------- the CLI


TINY = ["dataset=miniimagenet", "dataset.image_size=84", "train.steps=3", "train.val_every=3",
        "train.val_episodes=2", "eval.episodes=4", "eval.batch=2", "train.queries=5",
        "eval.queries=5", "device=cpu"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_trains_and_evaluates_on_each_layout(cli, tmp_path, jpegs, layout):
    root = make_copy(tmp_path / layout, layout, jpegs)
    run = tmp_path / "run"
    extra = ["backbone.hidden=8"]
    if layout == "folders":  # and once with ResNet-12 and the on-device augmentation
        extra = ["backbone=resnet12", "backbone.widths=[4,8,8,8]", "backbone.keep_prob=0.9",
                 "augment=standard"]
    ok(cli("train", *TINY, *extra, f"dataset.root={root}", f"hydra.run.dir={run}"))
    out = ok(cli("eval", f"ckpt={run / 'best.pt'}")).stdout
    assert "5-way 1-shot (5 queries) test accuracy" in out


def test_cli_missing_data_is_one_clear_sentence(fewshot, tmp_path):
    proc = fewshot("train", *TINY, f"dataset.root={tmp_path / 'none'}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "scripts/prepare_miniimagenet.py" in proc.stderr


# ---------------------------------------------------------------- scripts/prepare_miniimagenet.py


def test_prepare_script_builds_the_csv_layout_from_imagenet(tmp_path):
    """Two classes per split from a fake ILSVRC-2012 train folder (one class as a .tar)."""
    import sys
    import tarfile

    imagenet, splits, out = tmp_path / "ilsvrc", tmp_path / "splits", tmp_path / "mini"
    splits.mkdir()
    g = torch.Generator().manual_seed(1)
    colours = {}
    for s, split in enumerate(SPLITS):
        rows = []
        for c in range(2):
            name = wnid(split, c)
            ids = torch.randperm(9000, generator=g)[:7] + 10  # ImageNet ids are not contiguous
            folder = imagenet / name
            folder.mkdir(parents=True)
            for i in ids.tolist():  # each image one flat colour, coding its id
                colours[(name, i)] = (i % 251, (i // 7) % 251, 40 * s + c)
                Image.new("RGB", (120, 96), colours[(name, i)]).save(folder / f"{name}_{i}.JPEG")
            if (s, c) == (0, 1):
                with tarfile.open(imagenet / f"{name}.tar", "w") as tar:
                    for p in folder.iterdir():
                        tar.add(p, arcname=p.name)
                for p in folder.iterdir():
                    p.unlink()
                folder.rmdir()
            rows += [[filename(name, k), name] for k in range(6)]  # the 6 smallest ids of 7
        with open(splits / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["filename", "label"], *rows])
    script = REPO / "scripts" / "prepare_miniimagenet.py"
    args = [sys.executable, str(script), "--imagenet", str(imagenet), "--splits", str(splits),
            "--out", str(out), "--workers", "2"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    store = MiniImageNet(str(out)).load("train")
    assert store.images.shape == (2, 6, 3, 84, 84)
    name = wnid("train", 1)  # the tar class: its 3rd image is the 3rd smallest id
    third = sorted(i for n, i in colours if n == name)[2]
    pixel = store.images[1, 2, :, 40, 40].tolist()
    assert all(abs(a - b) <= 3 for a, b in zip(pixel, colours[(name, third)], strict=True)), pixel
    again = subprocess.run(args, capture_output=True, text=True)  # nothing left to do
    assert again.returncode == 0 and "(0 new)" in again.stdout
    (splits / "val.csv").write_text(f"filename,label\n{filename('n09999999', 0)},n09999999\n")
    bad = subprocess.run(args, capture_output=True, text=True)
    assert bad.returncode == 2 and "class n09999999 is neither a folder nor a .tar" in bad.stderr
