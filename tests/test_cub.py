"""CUB-200-2011 on a generated fake of the official archive's layout: Chen et al.'s class split,
extraction, the md5 check, a faked download, and the one-sentence messages when it is missing."""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
from pathlib import Path

import pytest
from image_folder import make_image_folder

from fewshot_cli.data import cub
from fewshot_cli.data.cub import CUB
from fewshot_cli.data.splits import record_split
from fewshot_cli.errors import FewshotError

SPECIES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
           "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet",
           "007.Parakeet_Auklet", "008.Rhinoceros_Auklet"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """CUB_200_2011.tgz holding CUB_200_2011/images/<NNN.Species>/*.jpg and the top files."""
    where = tmp_path_factory.mktemp("cub-archive")
    make_image_folder(where / "CUB_200_2011" / "images", {s: 4 for s in SPECIES})
    (where / "CUB_200_2011" / "classes.txt").write_text(
        "".join(f"{i + 1} {s}\n" for i, s in enumerate(SPECIES)))
    path = where / "CUB_200_2011.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(where / "CUB_200_2011", arcname="CUB_200_2011")
    return path


def official(monkeypatch, archive: Path) -> None:
    """Make the fake archive's md5 the official one for this test."""
    monkeypatch.setattr(cub, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())


def archived(tmp_path: Path, archive: Path) -> Path:
    """A dataset.root holding only the (fake) official archive."""
    root = tmp_path / "cub"
    root.mkdir()
    (root / "CUB_200_2011.tgz").write_bytes(archive.read_bytes())
    return root


def test_chen_split_from_an_archive_in_the_root(tmp_path, monkeypatch, archive):
    official(monkeypatch, archive)
    root = archived(tmp_path, archive)
    ds = CUB(str(root), image_size=16, download=False)
    train, val, test = (ds.load(s) for s in ("train", "val", "test"))
    # class i (from 0, in name order): train when i%2==0, val when i%4==1, test when i%4==3
    assert train.names == [SPECIES[i] for i in (0, 2, 4, 6)]
    assert val.names == [SPECIES[1], SPECIES[5]] and test.names == [SPECIES[3], SPECIES[7]]
    assert train.images.shape == (4, 4, 3, 16, 16)
    assert (root / "CUB_200_2011" / "images").is_dir()
    assert [p.name for p in root.iterdir() if p.name.startswith(".cub-")] == []  # no scratch
    # extracted once: a later run reads the folder, even with the archive gone
    (root / "CUB_200_2011.tgz").unlink()
    assert CUB(str(root), image_size=16, download=False).load("test").names == test.names


def test_a_photo_in_a_train_and_a_test_species_is_refused(tmp_path, monkeypatch, archive):
    official(monkeypatch, archive)
    root = archived(tmp_path, archive)
    CUB(str(root), image_size=16, download=False).load("train")  # extracts the archive
    images = root / "CUB_200_2011" / "images"
    first = sorted((images / SPECIES[0]).iterdir())[0]  # class 0: train; class 3: test
    copied = images / SPECIES[3] / f"copy{first.suffix}"
    copied.write_bytes(first.read_bytes())
    with pytest.raises(FewshotError, match=rf"identical copy in another split: {first} \(train\)"
                                           rf" = {copied} \(test\); .*allow_duplicates=true"):
        record_split(CUB(str(root), image_size=16, download=False), tmp_path / "run")


def test_a_foreign_archive_is_refused(tmp_path, archive):
    root = tmp_path / "cub"
    root.mkdir()
    (root / "CUB_200_2011.tgz").write_bytes(archive.read_bytes())
    with pytest.raises(FewshotError, match="is not the official archive .its md5 is not 97ecee"):
        CUB(str(root), download=False).load("train")


def test_download_checks_the_md5_then_extracts(tmp_path, monkeypatch, archive):
    urls = []

    def fetch(url, dest):
        urls.append(url)
        Path(dest).write_bytes(archive.read_bytes())

    monkeypatch.setattr(cub, "_fetch", fetch)
    root = tmp_path / "data"
    with pytest.raises(FewshotError, match="has md5 [0-9a-f]+, not the official 97ecee"):
        CUB(str(root), image_size=16).load("train")
    assert urls == ["https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"]
    assert list(root.iterdir()) == []  # nothing half-downloaded left behind
    official(monkeypatch, archive)
    assert CUB(str(root), image_size=16).load("val").num_classes == 2
    assert (root / "CUB_200_2011.tgz").is_file() and (root / "CUB_200_2011" / "images").is_dir()


def test_missing_data_is_one_sentence_on_where_to_get_it(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cub, "_fetch", offline)
    with pytest.raises(FewshotError) as err:
        CUB(str(tmp_path / "none"), image_size=16).load("train")
    message = str(err.value)
    assert "no network" in message and "data.caltech.edu/records/65de6-vp158" in message
    assert "\n" not in message and list((tmp_path / "none").iterdir()) == []
    with pytest.raises(FewshotError, match="dataset.download=false; download CUB_200_2011.tgz "
                                           "from https://data.caltech.edu"):
        CUB(str(tmp_path / "none"), download=False).load("train")


def test_cli_trains_and_evaluates_on_cub(cli, tmp_path, monkeypatch, archive):
    root = tmp_path / "cub"
    make_image_folder(root / "CUB_200_2011" / "images", {s: 4 for s in SPECIES})
    run = tmp_path / "run"
    args = ["dataset=cub", f"dataset.root={root}", "dataset.image_size=16", "backbone.hidden=8",
            "train.ways=2", "train.queries=2", "eval.ways=2", "eval.queries=2", "train.steps=2",
            "train.val_every=2", "train.val_episodes=2", "eval.episodes=4", "device=cpu",
            f"hydra.run.dir={run}"]
    proc = cli("train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cli("eval", f"ckpt={run / 'best.pt'}")
    assert out.returncode == 0 and "2-way 1-shot (" in out.stdout, out.stderr[-3000:]
