"""The Omniglot reader: a tiny fake release (folders and zips), the real one, and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from fewshot_cli.data import images, omniglot
from fewshot_cli.data.omniglot import Omniglot
from fewshot_cli.data.splits import integrity_problems, record_split
from fewshot_cli.errors import FewshotError

# source -> alphabet -> characters; Greek and Latin are in both small sets, as in the release
FAKE = {
    "images_background": {"Alpha": 3, "Beta": 2},
    "images_evaluation": {"Eps": 2, "Eta": 3, "Iota": 1, "Zeta": 2},
    "images_background_small1": {"Greek": 2, "Latin": 2, "Balinese": 1},
    "images_background_small2": {"Greek": 2, "Latin": 2, "Sanskrit": 1, "Tagalog": 2},
}
DRAWERS = 20


def png(seed: int, size: int = 12) -> bytes:
    """A 1-bit PNG like Omniglot's, with a pattern unique to ``seed``."""
    bits = torch.rand(size, size, generator=torch.Generator().manual_seed(seed)) > 0.5
    img = Image.frombytes("L", (size, size), (bits.to(torch.uint8) * 255).numpy().tobytes())
    out = io.BytesIO()
    img.convert("1").save(out, format="PNG")
    return out.getvalue()


def members(name: str, drawers: int = DRAWERS) -> dict[str, bytes]:
    files, seed = {}, list(FAKE).index(name) * 10_000  # every image of the release its own
    for alphabet, chars in FAKE[name].items():
        for c in range(1, chars + 1):
            for d in range(1, drawers + 1):
                seed += 1
                files[f"{name}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png"] = png(seed)
    return files


def make_release(root: Path, zipped: bool, names: tuple[str, ...] = tuple(FAKE)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if zipped:
            with zipfile.ZipFile(root / f"{name}.zip", "w") as z:
                for path, data in members(name).items():
                    z.writestr(path, data)
        else:
            for path, data in members(name).items():
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(data)
    return root


@pytest.fixture(params=["folders", "zips"])
def fake_root(request, tmp_path) -> Path:
    return make_release(tmp_path / request.param, zipped=request.param == "zips")


def sizes(ds: Omniglot) -> tuple[int, int, int]:
    return tuple(ds.load(s).num_classes for s in ("train", "val", "test"))


def test_fake_release_split_counts(fake_root):
    lake = Omniglot(fake_root, split="lake", image_size=8, rotations=[0, 90, 180, 270])
    train = lake.load("train")
    assert train.images.shape == (5 * 4, DRAWERS, 1, 8, 8) and train.images.dtype == torch.uint8
    assert sizes(lake) == (20, 5, 3)  # val: Eps + Eta (first half sorted), test: Iota + Zeta
    assert {n.split("/")[1] for n in lake.load("val").names} == {"Eps", "Eta"}
    assert train.names[0] == "images_background/Alpha/character01/rot000"

    minimal = Omniglot(fake_root, split="minimal", image_size=8, rotations=[0])
    assert sizes(minimal) == (5, 3, 3)  # val = test = Sanskrit + Tagalog from small2
    assert minimal.load("val").names == minimal.load("test").names
    assert all(n.startswith("images_background_small2/") for n in minimal.load("test").names)

    custom = Omniglot(fake_root, split="custom", image_size=8, rotations=[0],
                      alphabets={"train": ["Alpha", "Greek"], "val": ["Eta"], "test": ["Tagalog"]})
    assert sizes(custom) == (5, 3, 2)
    # Greek is in both small sets; the first source holding it wins
    assert "images_background_small1/Greek/character01" in custom.load("train").names


def test_alphabets_are_groups_and_drawers_come_from_file_names(fake_root):
    lake = Omniglot(fake_root, split="lake", image_size=8, rotations=[0, 90])
    test = lake.load("test")  # Iota (1 character) + Zeta (2)
    assert test.groups == ["Iota", "Zeta", "Zeta"]
    assert test.drawers.tolist() == [list(range(DRAWERS))] * 3  # <char>_<drawer>.png, from 0
    train = lake.load("train")  # rotated copies keep their alphabet and drawers
    assert train.groups == ["Alpha"] * 3 + ["Beta"] * 2 + ["Alpha"] * 3 + ["Beta"] * 2
    assert train.drawers.shape == (10, DRAWERS) and int(train.drawers.min()) == 0


def test_lake_minimal_tests_on_the_evaluation_alphabets(fake_root):
    ds = Omniglot(fake_root, split="lake_minimal", image_size=8, rotations=[0])
    minimal = Omniglot(fake_root, split="minimal", image_size=8, rotations=[0])
    assert ds.load("train").names == minimal.load("train").names  # background_small1 only
    assert ds.load("val").names == minimal.load("val").names  # background alphabets only
    assert {n.split("/")[0] for n in ds.load("test").names} == {"images_evaluation"}
    assert ds.load("test").num_classes == 8


def test_folders_and_zips_decode_identically(tmp_path):
    a = Omniglot(make_release(tmp_path / "f", zipped=False), split="lake", image_size=10)
    b = Omniglot(make_release(tmp_path / "z", zipped=True), split="lake", image_size=10)
    sa, sb = a.load("test"), b.load("test")
    assert sa.names == sb.names and torch.equal(sa.images, sb.images)
    assert sa.images.float().std() > 0  # real content, not a blank tensor


def test_cache_is_used_then_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = make_release(tmp_path / "r", zipped=False, names=("images_background_small1",
                                                             "images_background_small2"))
    first = Omniglot(root, split="minimal", image_size=8).load("val")

    def no_decode(*args):
        raise AssertionError("decoded again although the cache is fresh")

    monkeypatch.setattr(omniglot, "decode_source", no_decode)
    assert torch.equal(Omniglot(root, split="minimal", image_size=8).load("val").images,
                       first.images)
    victim = next((root / "images_background_small2/Tagalog/character01").iterdir())
    victim.write_bytes(png(123_456))
    with pytest.raises(AssertionError, match="decoded again"):
        Omniglot(root, split="minimal", image_size=8).load("val")


def test_any_image_size(tmp_path):
    root = make_release(tmp_path / "r", zipped=True, names=("images_background_small1",))
    store = Omniglot(root, split="minimal", image_size=21, rotations=[0]).load("train")
    assert store.images.shape == (5, DRAWERS, 1, 21, 21)


@pytest.mark.parametrize("zipped", [False, True])
def test_corrupt_image_names_the_file(tmp_path, monkeypatch, zipped):
    monkeypatch.setattr(images, "PARALLEL_FROM", 10)  # the error must cross the process pool
    root = tmp_path / "r"
    make_release(root, zipped=False, names=("images_background",))
    bad = root / "images_background/Beta/character02/0207_07.png"
    bad.write_bytes(bad.read_bytes()[:30])  # a truncated PNG
    if zipped:
        with zipfile.ZipFile(root / "images_background.zip", "w") as z:
            for f in sorted((root / "images_background").rglob("*.png")):
                z.write(f, f.relative_to(root).as_posix())
        for f in sorted((root / "images_background").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (root / "images_background").rmdir()
    with pytest.raises(FewshotError, match="Beta/character02/0207_07.png") as err:
        Omniglot(root, split="lake").load("train")
    if zipped:
        assert "images_background.zip:images_background/Beta" in str(err.value)


def test_unknown_split_and_alphabet(fake_root):
    with pytest.raises(FewshotError, match=r"dataset\.split=tiny .*vinyals, vinyals_trainval, "
                                           r"lake, minimal"):
        Omniglot(fake_root, split="tiny")
    with pytest.raises(FewshotError, match=r"dataset\.alphabets.* needs alphabets"):
        Omniglot(fake_root, split="custom", alphabets={"train": ["Alpha"]})
    with pytest.raises(FewshotError, match=r"dataset\.alphabets.*Alpha.*apart"):
        Omniglot(fake_root, split="custom",
                 alphabets={"train": ["Alpha"], "val": ["Alpha"], "test": ["Eta"]})
    bad = Omniglot(fake_root, split="custom",
                   alphabets={"train": ["Klingon"], "val": ["Eta"], "test": ["Zeta"]})
    with pytest.raises(FewshotError,
                       match=r"dataset\.alphabets\.train names Klingon.*Alpha, Balinese, Beta"):
        bad.load("train")


def test_vinyals_needs_the_full_release(fake_root):
    with pytest.raises(FewshotError, match="dataset.split=vinyals needs the full"):
        Omniglot(fake_root, split="vinyals").load("val")


def test_offline_download_fails_with_both_fixes(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(omniglot, "_fetch", offline)
    with pytest.raises(FewshotError) as err:
        Omniglot(tmp_path / "empty", split="minimal").load("train")
    message = str(err.value)
    assert "dataset.root=" in message and "dataset=glyphs" in message and "no network" in message
    assert "\n" not in message
    assert list((tmp_path / "empty").iterdir()) == []  # no half-downloaded file left behind
    with pytest.raises(FewshotError, match=r"dataset\.download=false.*dataset=glyphs"):
        Omniglot(tmp_path / "empty", split="minimal", download=False).load("train")


def test_download_checks_md5(tmp_path, monkeypatch):
    served = make_release(tmp_path / "server", zipped=True, names=("images_background_small1",))
    payload = (served / "images_background_small1.zip").read_bytes()
    urls = []

    def fetch(url, dest):
        urls.append(url)
        Path(dest).write_bytes(payload)

    monkeypatch.setattr(omniglot, "_fetch", fetch)
    root = tmp_path / "data"
    with pytest.raises(FewshotError, match="md5 .* not the official e704a628"):
        Omniglot(root, split="minimal").load("train")
    assert urls == ["https://github.com/brendenlake/omniglot/raw/master/python/"
                    "images_background_small1.zip"]
    assert not (root / "images_background_small1.zip").exists()
    assert [p.name for p in root.iterdir()] == []

    # the same bytes pass when they are what the checksum expects
    monkeypatch.setitem(omniglot.MD5, "images_background_small1",
                        hashlib.md5(payload).hexdigest())
    store = Omniglot(root, split="minimal", image_size=8, rotations=[0]).load("train")
    assert store.num_classes == 5 and (root / "images_background_small1.zip").exists()


# ---- split integrity and the split record


def test_rotations_of_a_symmetric_character_are_not_duplicates(tmp_path, caplog):
    root = make_release(tmp_path / "r", zipped=False, names=("images_background_small1",
                                                             "images_background_small2"))
    folder = root / "images_background_small1/Greek/character01"
    for i, png_path in enumerate(sorted(folder.iterdir())):
        # concentric square rings, a different set per drawer: the same under every rotation
        ring = torch.minimum(torch.arange(12)[:, None], torch.arange(12)[None, :])
        ring = torch.minimum(ring, ring.flip(0).flip(1))
        ink = ((i + 1) >> ring) & 1
        Image.fromarray(((1 - ink) * 255).to(torch.uint8).numpy()).convert("1").save(png_path)
    ds = Omniglot(root, split="minimal", image_size=8, rotations=[0, 90, 180, 270])
    with caplog.at_level(logging.WARNING):
        record_split(ds, tmp_path / "run")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["splits"]["train"]) == 5 * 4 and split["split"] == "minimal"
    # minimal's val and test are the same characters by design: not a class in two splits
    assert split["splits"]["val"] == split["splits"]["test"]


@pytest.mark.parametrize("zipped", [False, True])
def test_an_image_copied_into_a_test_alphabet_is_refused(tmp_path, zipped):
    root = make_release(tmp_path / "r", zipped=False, names=("images_background",
                                                             "images_evaluation"))
    train_png = root / "images_background/Alpha/character01/0101_01.png"
    test_png = root / "images_evaluation/Zeta/character02/0207_07.png"
    shutil.copy(train_png, test_png)
    # and a pair within the train split: a warning only
    same = root / "images_background/Beta/character01/0105_05.png"
    shutil.copy(root / "images_background/Beta/character01/0104_04.png", same)
    if zipped:
        for name in ("images_background", "images_evaluation"):
            shutil.make_archive(str(root / name), "zip", root, name)
            shutil.rmtree(root / name)
    ds = Omniglot(root, split="lake", image_size=8)
    with pytest.raises(FewshotError) as err:
        record_split(ds, tmp_path / "run")
    where = (lambda p: f"{root / p.split('/')[0]}.zip:{p}") if zipped else \
        (lambda p: str(root / p))
    assert str(err.value).startswith(
        f"1 image(s) have an identical copy in another split: "
        f"{where('images_background/Alpha/character01/0101_01.png')} (train) = "
        f"{where('images_evaluation/Zeta/character02/0207_07.png')} (test); ")
    assert not (tmp_path / "run" / "split.json").exists()
    ok = Omniglot(root, split="lake", image_size=8, allow_duplicates=True)
    record_split(ok, tmp_path / "run")  # accepted knowingly
    assert (tmp_path / "run" / "split.json").exists()


def test_eval_of_moved_data_names_the_root_and_downloads_nothing(fewshot, tmp_path):
    root = make_release(tmp_path / "data" / "omniglot", zipped=True,
                        names=("images_background_small1", "images_background_small2"))
    run = tmp_path / "run"
    args = ["dataset=omniglot", "dataset.split=minimal", "dataset.image_size=16",
            "backbone.hidden=8", "train.ways=2", "train.queries=2", "eval.queries=2",
            "train.steps=2", "train.val_every=2", "train.val_episodes=2", "eval.episodes=2",
            "device=cpu"]
    proc = fewshot("train", *args, f"dataset.root={root}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "data", moved)
    out = fewshot("eval", f"ckpt={run / 'best.pt'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        f"fewshot: error: the data this run was trained on is not in dataset.root={root} any "
        "more (nothing was downloaded); evaluate with dataset.root=<the folder that holds it "
        "now>")
    assert not (tmp_path / "data").exists()  # the old root was not created to download into
    again = fewshot("eval", f"ckpt={run / 'best.pt'}", f"dataset.root={moved / 'omniglot'}")
    assert again.returncode == 0, again.stderr[-2000:]


# ---- the real release ($FEWSHOT_DATA/omniglot), decoded once per test session


def alphabets(store) -> set[str]:
    return {n.split("/")[1] for n in store.names}


def test_real_vinyals(omniglot_root):
    ds = Omniglot(omniglot_root, split="vinyals", rotations=[0, 90, 180, 270], download=False)
    train, val, test = (ds.load(s) for s in ("train", "val", "test"))
    assert (train.num_classes, val.num_classes, test.num_classes) == (1028 * 4, 172, 423)
    assert train.images.shape[1:] == (20, 1, 28, 28)
    assert alphabets(val) == set(omniglot.VINYALS_VAL)
    assert test.names[0] == "images_evaluation/Gurmukhi/character42"
    assert test.names[-1] == "images_evaluation/ULOG/character26"
    assert "images_evaluation/Gurmukhi/character41/rot000" in train.names
    base = {n.rsplit("/rot", 1)[0] for n in train.names}
    assert len(base | set(val.names) | set(test.names)) == 1623
    # black strokes on white: mostly white pixels, some dark ones
    assert test.images.float().mean() > 200 and test.images.min() < 50


def test_real_vinyals_trainval(omniglot_root):
    """Snell et al.'s second stage: Vinyals et al.'s train and val characters together (1200,
    x4 rotations), val the same 172 by design (no false alarm), test unchanged."""
    ds = Omniglot(omniglot_root, split="vinyals_trainval", rotations=[0, 90, 180, 270],
                  download=False)
    plain = Omniglot(omniglot_root, split="vinyals", rotations=[0, 90, 180, 270], download=False)
    stores = {s: ds.load(s) for s in ("train", "val", "test")}
    assert [stores[s].num_classes for s in stores] == [1200 * 4, 172, 423]
    assert set(stores["train"].names) == set(plain.load("train").names) | \
        set(plain.load("val").rotated([0, 90, 180, 270]).names)
    assert stores["val"].names == plain.load("val").names
    assert stores["test"].names == plain.load("test").names
    assert not [p for p in integrity_problems(ds, stores) if p.stops], \
        integrity_problems(ds, stores)


def test_real_lake(omniglot_root):
    ds = Omniglot(omniglot_root, split="lake", rotations=[0], download=False)
    train, val, test = (ds.load(s) for s in ("train", "val", "test"))
    assert train.num_classes == 964 and len(alphabets(train)) == 30
    assert val.num_classes + test.num_classes == 659
    assert len(alphabets(val)) == len(alphabets(test)) == 10
    assert "Angelic" in alphabets(val) and "ULOG" in alphabets(test)


def test_real_minimal(omniglot_root):
    ds = Omniglot(omniglot_root, split="minimal", rotations=[0, 90, 180, 270], download=False)
    train, val, test = (ds.load(s) for s in ("train", "val", "test"))
    assert train.num_classes == 136 * 4 and val.num_classes == test.num_classes == 106
    assert alphabets(val) == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert val.names == test.names and torch.equal(val.images, test.images)
    # the challenge's minimal setting tests on all 20 evaluation alphabets instead
    lake = Omniglot(omniglot_root, split="lake_minimal", rotations=[0], download=False)
    assert lake.load("test").num_classes == 659 and len(set(lake.load("test").groups)) == 20


def test_real_custom(omniglot_root):
    ds = Omniglot(omniglot_root, split="custom", rotations=[0], download=False,
                  alphabets={"train": ["Greek", "Latin"], "val": ["Korean"], "test": ["Tagalog"]})
    assert sizes(ds) == (24 + 26, 40, 17)
    assert ds.load("train").names[0] == "images_background/Greek/character01"
