"""fewshot data: the data checks of fewshot train without training, through the real CLI: a
crafted folder with every kind of planted problem, generated glyphs, bandits, missing data, and
the real Omniglot release."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from image_folder import make_image_folder
from PIL import Image

LAYOUT = {"train/a": 6, "train/b": 6, "train/tiny": 2, "val/c": 6, "val/e": 6, "test/a": 6,
          "test/d": 6}


def planted(root: Path) -> Path:
    """Split folders with one problem of each kind: an undecodable file, a class under
    dataset.min_images, a transparent image, a class in two splits, an identical image across
    splits and one within the train split."""
    make_image_folder(root, LAYOUT, corrupt="val/c")
    shutil.copy(root / "train/b/001.png", root / "test/d/copy.png")
    shutil.copy(root / "train/a/003.png", root / "train/b/copy.png")
    alpha = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    for x in range(5, 25):
        alpha.putpixel((x, 15), (0, 0, 0, 255))
    alpha.save(root / "val/e/alpha.png")
    return root


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fewshot: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_every_planted_problem_is_listed(fewshot, tmp_path, own_cache):
    root = planted(tmp_path / "mine")
    work = tmp_path / "work"
    work.mkdir()
    before = files(root)
    args = ["data", "dataset=folder", f"dataset.root={root}", "dataset.image_size=16"]
    proc = fewshot(*args, cwd=work)
    assert error(proc) == ("fewshot: error: 3 problem(s) above would stop fewshot train; fix "
                           "them and run fewshot data again")
    out = proc.stdout
    for line in [
        "6 finding(s), 3 of them would stop fewshot train:",
        "STOPS TRAIN: 1 file(s) cannot be decoded",
        f"    cannot decode the image {root / 'val/c/broken.png'} (image file is truncated); "
        "delete or replace it",
        "note: 1 class(es) have fewer than dataset.min_images=5 images and are left out",
        "    train/tiny (2)",
        "note: 1 image(s) have transparent pixels, composited over a white page as a viewer "
        "shows them",
        f"    {root / 'val/e/alpha.png'} (val)",
        "STOPS TRAIN: 1 class(es) are in two splits; a class belongs to one split",
        "    a (train/a in train, test/a in test)",
        "STOPS TRAIN: 1 image(s) have an identical copy in another split; a test image seen in "
        "training inflates the figure",
        f"    {root / 'train/b/001.png'} (train) = {root / 'test/d/copy.png'} (test)",
        "note: 1 image(s) of the train split have an identical copy under another class or name",
        f"    {root / 'train/a/003.png'} (train) = {root / 'train/b/copy.png'} (train)",
    ]:
        assert any(got.startswith(line) for got in out.splitlines()), (line, out)
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["train"], ["val"], ["test"])}
    assert rows["train"][1:7] == ["2", "6", "/", "6", "/", "7"] and rows["train"][7] == "13"
    assert "RGBA 1" in " ".join(rows["val"])  # the modes found in the files
    assert files(root) == before and not any(work.iterdir())  # nothing written there
    assert not own_cache.exists() or not any(own_cache.iterdir())  # no cache with a hole

    (root / "val/c/broken.png").unlink()
    assert error(fewshot(*args)).startswith("fewshot: error: 2 problem(s) above")
    assert len(list(own_cache.glob("folder-*.pt"))) == 1  # the cache fewshot train would write
    shutil.rmtree(root / "test/a")
    (root / "test/d/copy.png").unlink()
    clean = fewshot(*args)
    assert clean.returncode == 0, clean.stderr
    assert "3 finding(s), 0 of them would stop fewshot train:" in clean.stdout


def test_duplicates_accepted_knowingly_do_not_stop(fewshot, tmp_path):
    root = make_image_folder(tmp_path / "mine", {"train/a": 5, "val/b": 5, "test/c": 5})
    shutil.copy(root / "train/a/000.jpg", root / "test/c/same.jpg")
    args = ["data", "dataset=folder", f"dataset.root={root}", "dataset.image_size=16"]
    assert error(fewshot(*args)).startswith("fewshot: error: 1 problem(s) above")
    proc = fewshot(*args, "dataset.allow_duplicates=true")
    assert proc.returncode == 0, proc.stderr
    assert "note: 1 image(s) have an identical copy in another split" in proc.stdout


def test_glyphs_pass_and_bandits_have_nothing_to_check(fewshot):
    proc = fewshot("data", "dataset=glyphs", "dataset.classes.train=20", "dataset.classes.val=8",
               "dataset.classes.test=8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("no problem found")
    table = [line.split() for line in proc.stdout.splitlines()]
    assert ["train", "20", "20", "/", "20", "/", "20", "400", "L", "400", "28x28", "400"] in table
    bandits = fewshot("data", "dataset=bandits")
    assert bandits.returncode == 0, bandits.stderr
    assert bandits.stdout.strip() == ("dataset=bandits draws its tasks on the fly (multi-armed "
                                      "bandit tasks): "
                                      "there are no files and no splits to check")


def test_missing_data_is_one_sentence(fewshot, tmp_path):
    assert error(fewshot("data", "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}")) == (
        f"fewshot: error: dataset=folder finds no data in dataset.root={tmp_path / 'nowhere'}, "
        "so nothing was checked; set dataset.root=<the folder that holds it> (fewshot train "
        "would download what can be downloaded there)")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.real_data
def test_real_omniglot_vinyals_summary(cli, omniglot_root):
    """The acceptance check of issue 19: the Vinyals split with rotations, no false alarm. The
    release holds one pair of byte-identical files (a Braille dot drawn alike by drawers 3 and
    19), within the train split: a note, not a stop."""
    proc = cli("data", "dataset=omniglot", f"dataset.root={omniglot_root}",
               "dataset.download=false")
    assert proc.returncode == 0, proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()]
    for split, classes, files in (("train", "4112", "20560"), ("val", "172", "3440"),
                                  ("test", "423", "8460")):
        assert [split, classes, "20", "/", "20", "/", "20", files, "1", files, "105x105",
                files] in table, proc.stdout
    braille = omniglot_root / "images_background/Braille/character01"
    assert "1 finding(s), 0 of them would stop fewshot train:" in proc.stdout
    assert f"    {braille / '0192_03.png'} (train) = {braille / '0192_19.png'} (train)" in \
        proc.stdout.splitlines()
