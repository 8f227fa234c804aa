"""Your own images (dataset=folder): layouts, splits, channels, transparency, split integrity,
bad input, and the real CLI on a generated folder of coloured shapes (mixed sizes, PNG and JPEG,
a corrupt file, a tiny class): the split recorded, resume and eval checked against it."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import eval_result
from image_folder import make_image_folder
from PIL import Image

from fewshot_cli.data import images
from fewshot_cli.data.folder import Folder, hash_order
from fewshot_cli.data.splits import check_split, record_split
from fewshot_cli.errors import FewshotError

# 10 usable classes (6 in two parent folders, 4 at the top) and one with too few images
LAYOUT = {"shapes_a/c0": 8, "shapes_a/c1": 9, "shapes_a/c2": 7, "shapes_b/c3": 8, "shapes_b/c4": 6,
          "shapes_b/c5": 8, "c6": 7, "c7": 9, "c8": 8, "c9": 6, "tiny": 3}
KEPT = sorted(n for n in LAYOUT if n != "tiny")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> object:
    return make_image_folder(tmp_path_factory.mktemp("shapes"), LAYOUT)


def test_classes_groups_and_the_seeded_split(shapes, caplog):
    with caplog.at_level(logging.WARNING):
        ds = Folder(str(shapes), image_size=12)
        parts = {s: ds.load(s) for s in ("train", "val", "test")}
    assert "left out 1 of 11 classes with fewer than dataset.min_images=5 images: tiny (3)" in \
        caplog.text
    names = [n for s in parts.values() for n in s.names]
    assert sorted(names) == KEPT and [len(p.names) for p in parts.values()] == [6, 2, 2]
    assert names == hash_order(KEPT, 0)  # the split is the hash order, cut at 0.6/0.2/0.2
    store = parts["train"]
    assert store.images.shape[1:] == (9, 3, 12, 12) and store.channels == 3  # coloured: RGB
    assert store.counts.tolist() == [LAYOUT[n] for n in store.names]
    group = dict(zip(store.names, store.groups, strict=True))
    assert all(group[n] == (n.split("/")[0] if "/" in n else ".") for n in store.names)
    other = Folder(str(shapes), image_size=12, seed=1)
    assert other.splits != ds.splits  # another seed, another split


def test_adding_a_class_moves_few_others():
    names = [f"class{i:03d}" for i in range(100)]
    order, more = hash_order(names, 0), hash_order([*names, "new"], 0)
    assert [n for n in more if n != "new"] == order  # the others keep their relative order


def test_split_folders_explicit_classes_and_grey_images(tmp_path):
    root = make_image_folder(tmp_path / "splits", {
        "train/a": 5, "train/b": 5, "train/g/c": 5, "val/d": 5, "val/e": 5, "test/f": 5,
        "test/h": 5}, grey=True)
    ds = Folder(str(root), image_size=10)
    assert ds.load("train").names == ["train/a", "train/b", "train/g/c"]
    assert ds.load("test").names == ["test/f", "test/h"]
    assert ds.load("train").channels == 1  # every image grey: one channel
    assert Folder(str(root), image_size=10, channels=3).load("val").channels == 3
    flat = make_image_folder(tmp_path / "flat", {"a": 5, "b": 5, "g/c": 5, "g/d": 5})
    chosen = Folder(str(flat), image_size=10, classes={"train": ["a", "g/c"], "val": ["b"],
                                                       "test": ["g/d"]})
    assert chosen.load("train").names == ["a", "g/c"] and chosen.load("test").groups == ["g"]


def test_the_split_used_is_written(shapes, tmp_path):
    ds = Folder(str(shapes), image_size=12)
    record_split(ds, tmp_path)
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["split_by"] == "dataset.split_fractions" and split["left_out"] == {"tiny": 3}
    assert list(split["splits"]["train"]) == ds.splits["train"] and split["channels"] == 3
    fingerprints = [f for s in split["splits"].values() for f in s.values()]
    assert len(set(fingerprints)) == len(KEPT)  # one per class, each its own


def transparent_copy(source, target) -> None:
    """Each image of ``source`` as strokes in the alpha channel over a transparent black page,
    which a viewer shows exactly as the opaque image over white."""
    for path in sorted(source.rglob("*.*")):
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
        ink = 255 - rgb.min(axis=2)  # darkness: how opaque the stroke is
        colour = np.where(ink[..., None] > 0, 255 - (255 - rgb) * 255 / np.maximum(
            ink[..., None], 1), 0)
        rgba = np.dstack([np.rint(colour), ink]).clip(0, 255).astype(np.uint8)
        out = target / path.relative_to(source).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(out)


def test_transparent_images_decode_as_their_opaque_copy(tmp_path):
    opaque = make_image_folder(tmp_path / "opaque", {"a": 5, "b": 5, "c": 5}, grey=True)
    for path in list(opaque.rglob("*.jpg")):  # lossless, so the two copies hold equal pixels
        Image.open(path).save(path.with_suffix(".png"))
        path.unlink()
    transparent_copy(opaque, tmp_path / "alpha")
    seen = Folder(str(tmp_path / "alpha"), image_size=16).load("train")
    want = Folder(str(opaque), image_size=16).load("train")
    assert float(seen.images.float().mean()) > 150  # a white page, not black
    assert (seen.images.int() - want.images.int()).abs().max() <= 1


def test_a_class_in_two_split_folders_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "leak", {f"{s}/{c}": 5 for s in ("train", "val", "test")
                                                 for c in ("cat", "dog")})
    ds = Folder(str(root), image_size=8)
    with pytest.raises(FewshotError, match=r"2 class\(es\) are in two splits: cat \(train/cat "
                                           r"in train, val/cat in val, test/cat in test\); dog "
                                           r"\(train/dog .*\); a class belongs to one split"):
        record_split(ds, tmp_path / "run")
    assert not (tmp_path / "run" / "split.json").exists()


def test_identical_images_across_splits_are_refused_and_within_one_reported(tmp_path, caplog):
    root = make_image_folder(tmp_path / "copies", {f"c{i}": 5 for i in range(5)})
    ds = Folder(str(root), image_size=8, split_fractions=[0.6, 0.2, 0.2])
    train, test = ds.splits["train"], ds.splits["test"]
    shutil.copy(root / train[0] / "001.png", root / test[0] / "copied.png")
    shutil.copy(root / train[0] / "002.jpg", root / train[1] / "same.jpg")
    shutil.copy(root / train[0] / "003.png", root / train[0] / "again.png")
    ds = Folder(str(root), image_size=8, split_fractions=[0.6, 0.2, 0.2])
    with pytest.raises(FewshotError) as err:
        record_split(ds, tmp_path / "run")
    assert str(err.value) == (
        f"1 image(s) have an identical copy in another split: {root / train[0] / '001.png'} "
        f"(train) = {root / test[0] / 'copied.png'} (test); a test image seen in training "
        "inflates the figure, so remove one copy of each, or set dataset.allow_duplicates=true "
        "to accept them")
    accepted = Folder(str(root), image_size=8, split_fractions=[0.6, 0.2, 0.2],
                      allow_duplicates=True)
    with caplog.at_level(logging.WARNING):
        record_split(accepted, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("identical copy in another split" in w for w in warnings)
    within = next(w for w in warnings if "of the train split" in w)
    assert within.startswith("2 image(s) of the train split have an identical copy")
    assert f"{root / train[0] / '002.jpg'} (train) = {root / train[1] / 'same.jpg'}" in within
    assert f"{root / train[0] / '003.png'} (train) = {root / train[0] / 'again.png'}" in within


def test_data_that_no_longer_reads_keeps_the_finding_not_the_readers_fix(tmp_path):
    """A reader's fix may name keys that eval and resume cannot change (dataset.split_fractions):
    against a record, the sentence keeps the finding and says to restore the data."""
    root = make_image_folder(tmp_path / "mine", {f"c{i}": 5 for i in range(5)})
    run = tmp_path / "run"
    record_split(Folder(str(root), image_size=8), run)
    for name in sorted(root.iterdir())[:3]:  # two classes left: none for the test split
        shutil.rmtree(name)
    with pytest.raises(FewshotError) as err:
        check_split(Folder(str(root), image_size=8), run)
    assert str(err.value) == (
        f"the data under dataset.root={root} no longer reads as this run recorded it in "
        f"{run / 'split.json'} (the test split of {root} has no class (of 2 with at least "
        "dataset.min_images=5 images)); restore the data as recorded (or point dataset.root at "
        "such a copy), or train a new run on the data as it is now")
    shutil.move(root, tmp_path / "moved")
    with pytest.raises(FewshotError, match=r"not in dataset.root=.*mine any more \(nothing was "
                                           r"downloaded\); resume with dataset.root=<the folder"):
        record_split(Folder(str(root), image_size=8), run, resuming=True)


def test_every_class_below_min_images_is_one_sentence(tmp_path):
    root = make_image_folder(tmp_path / "few", {"a": 3, "b": 4, "c": 2})
    with pytest.raises(FewshotError, match=r"every class in .*few has fewer than "
                                           r"dataset.min_images=5 images \(the largest has 4\); "
                                           "add images or set dataset.min_images=4"):
        Folder(str(root)).input_spec()


def test_corrupt_image_is_named_even_across_the_process_pool(tmp_path, monkeypatch, own_cache):
    monkeypatch.setattr(images, "PARALLEL_FROM", 4)
    root = make_image_folder(tmp_path / "bad", {"a": 5, "b": 5, "c": 5}, corrupt="b")
    with pytest.raises(FewshotError, match=f"cannot decode the image {root / 'b' / 'broken.png'} "
                                           r"\(.*\); delete or replace it"):
        Folder(str(root), image_size=8).load("train")
    assert not list(own_cache.glob("*.pt")), "a cache of a broken folder was kept"


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(FewshotError, match="dataset.root is not set"):
        Folder(None)
    with pytest.raises(FewshotError, match=r"dataset.split_fractions=\[0.5, 0.2\] must be three"):
        Folder(str(tmp_path), split_fractions=[0.5, 0.2])
    with pytest.raises(FewshotError, match="dataset.channels=2 must be 1, 3 or null"):
        Folder(str(tmp_path), channels=2)
    with pytest.raises(FewshotError, match="is not a folder"):
        Folder(str(tmp_path / "nowhere")).load("train")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FewshotError, match="no images found in .*empty"):
        Folder(str(tmp_path / "empty")).load("train")
    root = make_image_folder(tmp_path / "few", {"a": 5, "b": 5})
    with pytest.raises(FewshotError, match="the test split of .* has no class"):
        Folder(str(root)).load("train")
    with pytest.raises(FewshotError, match="dataset.classes names zebra, not a class folder"):
        Folder(str(root), classes={"train": ["a"], "val": ["b"], "test": ["zebra"]}).load("test")
    with pytest.raises(FewshotError, match="lists a in both train and test"):
        Folder(str(root), classes={"train": ["a"], "val": ["b"], "test": ["a"]})
    mixed = make_image_folder(tmp_path / "mixed", {"a": 5, "a/b": 5})
    with pytest.raises(FewshotError, match="holds both images and class folders"):
        Folder(str(mixed)).load("train")
    partial = make_image_folder(tmp_path / "partial", {"train/a": 5, "test/b": 5})
    with pytest.raises(FewshotError, match="has train/, test/ but no val/ folder"):
        Folder(str(partial)).load("train")


# ---------------------------------------------------------------- the real CLI

TINY = ["dataset=folder", "dataset.image_size=16", "backbone.hidden=8", "train.ways=3",
        "train.shots=1", "train.queries=2", "eval.ways=2", "eval.queries=2", "train.steps=3",
        "train.val_every=3", "train.val_episodes=2", "eval.episodes=4", "eval.batch=2",
        "device=cpu"]


def test_cli_trains_and_evaluates_on_your_own_images(cli, tmp_path):
    root = make_image_folder(tmp_path / "mine", LAYOUT, corrupt="shapes_a/c1")
    run = tmp_path / "run"
    bad = cli("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={run}")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
    broken = root / "shapes_a" / "c1" / "broken.png"
    assert f"fewshot: error: cannot decode the image {broken} (" in bad.stderr
    assert bad.stderr.strip().endswith("delete or replace it"), bad.stderr
    broken.unlink()

    proc = cli("train", *TINY, "augment=standard", f"dataset.root={root}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left out 1 of 11 classes with fewer than dataset.min_images=5 images: tiny (3)" in \
        proc.stdout + proc.stderr
    split = json.loads((run / "split.json").read_text())["splits"]
    assert sorted([*split["train"], *split["val"], *split["test"]]) == KEPT
    out = cli("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2-way 1-shot (2 queries) test accuracy" in out.stdout
    result = eval_result(run, 2, 1)
    assert result["episodes"] == 6 and 0.0 <= result["accuracy"] <= 1.0


def test_parent_folders_are_groups_for_within_group_episodes(tmp_path):
    from fewshot_cli.data.sampler import EpisodeSampler

    root = make_image_folder(tmp_path / "grouped", {
        "x/a": 5, "x/b": 5, "y/c": 5, "y/d": 5, "y/e": 5, "f": 5})
    ds = Folder(str(root), image_size=8, classes={"train": ["f"], "val": ["x/a"],
                                                  "test": ["x/b", "y/c", "y/d", "y/e"]})
    test = ds.load("test")
    assert test.groups == ["x", "y", "y", "y"]
    ep = EpisodeSampler(test, 3, 1, 1, meta_batch=4, within_group=True, split="test",
                        prefix="eval").sample()
    assert ep.support.shape == (4, 3, 3, 8, 8)
    with pytest.raises(FewshotError, match="the largest has 3"):
        EpisodeSampler(test, 4, 1, 1, within_group=True, split="test", prefix="eval")
    flat = Folder(str(make_image_folder(tmp_path / "flat", {"a": 5, "b": 5, "c": 5})))
    assert flat.load("train").groups is None  # no parent folders: no groups


def test_resume_and_eval_stop_when_the_split_moved(cli, tmp_path):
    """Issue 19, case 4: a test class deleted after training moves the split cut; resume and
    eval refuse in one sentence before anything is trained or scored, and the first split
    record stays as it was."""
    root = make_image_folder(tmp_path / "mine", {f"c{i}": 5 for i in range(8)})
    run = tmp_path / "run"
    proc = cli("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (run / "split.json").read_text()
    recorded = json.loads(first)["splits"]
    checkpoint = (run / "last.pt").read_bytes()

    changed = recorded["test"] and sorted(recorded["test"])[0]
    victim = root / changed / "001.png"
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)
    out = cli("eval", f"ckpt={run / 'best.pt'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"the images of {changed} (test) changed" in out.stderr
    assert "restore the data as recorded" in out.stderr and "test accuracy" not in out.stdout

    shutil.rmtree(root / sorted(recorded["test"])[-1])  # a test class deleted: the cut moves
    out = cli("train", f"resume={run / 'last.pt'}", "train.steps=6")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"fewshot: error: the data under dataset.root={root} is not the "
                            f"data this run started with ({run / 'split.json'}): ")
    moved = [n for n in recorded["train"] if f"{n} moved from train to val" in error]
    assert len(moved) == 1, error  # a class trained on would have become a validation class
    # shown first: the classes moved between splits; then how many other changes there are
    # (one class left test, another moved there, and the image changed above)
    assert "and 2 more; restore it as recorded" in error, error
    assert (run / "split.json").read_text() == first
    assert (run / "last.pt").read_bytes() == checkpoint  # nothing trained


def test_eval_of_a_run_without_a_split_record_goes_on(cli, tmp_path):
    root = make_image_folder(tmp_path / "mine", {f"c{i}": 5 for i in range(10)})
    run = tmp_path / "run"
    assert cli("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={run}").returncode == 0
    (run / "split.json").unlink()  # a run from before fewshot recorded its split
    out = cli("eval", f"ckpt={run / 'best.pt'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has no split.json (a run from before fewshot recorded its split)" in out.stdout
    assert "test accuracy" in out.stdout and eval_result(run, 2, 1)["step"] == 3
