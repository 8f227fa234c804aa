"""The class store: cache round trip, atomic writes, stale and damaged caches, where caches go,
rotations, select/concat."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import zero_a_quarter_of_the_images

from fewshot_cli.data import store as store_module
from fewshot_cli.data.store import ClassStore, cache_file, cached_store
from fewshot_cli.errors import FewshotError


def make_store(classes: int = 3, images: int = 4, size: int = 5) -> ClassStore:
    data = torch.randint(0, 256, (classes, images, 1, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(classes))
    return ClassStore(data, [f"c{i}" for i in range(classes)])


def same(a: ClassStore, b: ClassStore) -> bool:
    return torch.equal(a.images, b.images) and a.names == b.names and torch.equal(a.counts,
                                                                                 b.counts)


def test_save_load_roundtrip_leaves_no_temp_files(tmp_path):
    s = make_store()
    s.save(tmp_path / "s.pt")
    assert os.listdir(tmp_path) == ["s.pt"]
    assert same(ClassStore.load(tmp_path / "s.pt"), s)


def test_failed_save_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    old = make_store(2)
    old.save(tmp_path / "s.pt")

    def broken(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store_module.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        make_store(3).save(tmp_path / "s.pt")
    assert os.listdir(tmp_path) == ["s.pt"]
    monkeypatch.undo()
    assert same(ClassStore.load(tmp_path / "s.pt"), old)


def test_cached_store_builds_once_and_rebuilds_a_stale_cache(tmp_path):
    path, calls = tmp_path / "cache" / "s.pt", []

    def build() -> ClassStore:
        calls.append(1)
        return make_store()

    first = cached_store(path, build)
    second = cached_store(path, build)
    assert len(calls) == 1 and same(first, second)
    first = ClassStore(first.images.clone(), first.names, first.counts.clone())
    # a new file, not an in-place overwrite: the loaded stores memory-map the old one
    path.unlink()
    path.write_bytes(b"torn copy")  # a cache from a crash or another version
    assert same(cached_store(path, build), first) and len(calls) == 2
    path.unlink()
    torch.save({"version": -1}, path)
    cached_store(path, build)
    assert len(calls) == 3


def test_cache_file_depends_on_the_key_and_respects_read_only_data(tmp_path, monkeypatch):
    monkeypatch.delenv(store_module.CACHE_ENV)  # the tests' own cache folder (conftest)
    data = tmp_path / "data"
    data.mkdir()
    a = cache_file(data, {"reader": "x", "image_size": 28})
    assert a.parent == data / ".fewshot-cache" and a.name.startswith("x-")
    assert a != cache_file(data, {"reader": "x", "image_size": 105})
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    frozen.chmod(0o555)  # read-only data (even root must not write into it)
    try:
        b = cache_file(frozen, {"reader": "x"})
        assert b.parent == store_module.user_cache_dir() / "stores"
        assert not (frozen / ".fewshot-cache").exists()
    finally:
        frozen.chmod(0o755)


def test_rotated_makes_each_rotation_a_class():
    s = make_store(2, size=4)
    r = s.rotated([0, 90, 180, 270])
    assert r.num_classes == 8 and r.names[:3] == ["c0/rot000", "c1/rot000", "c0/rot090"]
    assert torch.equal(r.images[2], torch.rot90(s.images[0], 1, dims=(-2, -1)))
    assert torch.equal(r.images[6], torch.rot90(s.images[0], 3, dims=(-2, -1)))
    assert s.rotated([0]) is s
    with pytest.raises(FewshotError, match="multiples of 90"):
        s.rotated([0, 45])


def test_select_and_concat():
    s = make_store(3, images=4)
    assert s.select(["c2", "c0"]).names == ["c2", "c0"]
    assert torch.equal(s.select(["c2"]).images[0], s.images[2])
    with pytest.raises(FewshotError, match="nope"):
        s.select(["nope"])
    both = ClassStore.concat([s, make_store(2, images=6)])
    assert both.images.shape[:2] == (5, 6) and both.counts.tolist() == [4, 4, 4, 6, 6]
    assert both.min_images == 4


def test_a_damaged_cache_is_rebuilt_with_one_log_line(tmp_path, caplog):
    path, calls = tmp_path / "s.pt", []

    def build() -> ClassStore:
        calls.append(1)
        return make_store(3, images=40, size=20)

    first = cached_store(path, build)
    kept = first.images.clone()
    del first
    zero_a_quarter_of_the_images(path)
    with pytest.raises(store_module.DamagedCache):
        ClassStore.load(path)
    with caplog.at_level(logging.WARNING):
        again = cached_store(path, build)
    assert len(calls) == 2 and torch.equal(again.images, kept)
    damaged = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and str(path) in damaged[0].getMessage()
    assert ClassStore.load(path).names == ["c0", "c1", "c2"]  # the rebuilt cache is sound


def test_an_old_cache_version_is_rebuilt(tmp_path):
    """Version 1 caches decoded transparency as black: they must not be read."""
    path = tmp_path / "s.pt"
    old = make_store()
    torch.save({"version": 1, "images": torch.zeros_like(old.images), "names": old.names,
                "counts": old.counts}, path)
    assert same(cached_store(path, lambda: old), old)


def test_caches_go_to_fewshot_cache_when_set(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv(store_module.CACHE_ENV, str(tmp_path / "elsewhere"))
    where = cache_file(data, {"reader": "x"})
    assert where.parent == tmp_path / "elsewhere" and where.name.startswith("x-")
    assert not (data / ".fewshot-cache").exists()


def test_digests_and_origins_follow_select_concat_and_rotation():
    s = make_store(3, images=4)
    s.digests = torch.arange(1, 13).view(3, 4)
    s.origin = torch.arange(48, dtype=torch.int32).view(3, 4, 4)
    picked = s.select(["c2", "c0"])
    assert picked.digests.tolist() == [[9, 10, 11, 12], [1, 2, 3, 4]]
    short = ClassStore(torch.zeros(1, 2, 1, 5, 5, dtype=torch.uint8), ["d"],
                       digests=torch.tensor([[7, 8]]),
                       origin=torch.ones(1, 2, 4, dtype=torch.int32))
    both = ClassStore.concat([picked, short])
    assert both.digests[2].tolist() == [7, 8, 0, 0] and both.origin[2, 3].tolist() == [0] * 4
    assert ClassStore.concat([picked, make_store(1, images=4)]).digests is None  # one lacks them
    turned = s.rotated([0, 90])
    # a rotated class is the same source files: same digests (see fewshot_cli.data.splits)
    assert torch.equal(turned.digests, s.digests.repeat(2, 1))
    assert torch.equal(turned.origin[3:], s.origin)
    path_names = [store_module.unrotated(n) for n in turned.names]
    assert path_names == ["c0", "c1", "c2"] * 2 and store_module.unrotated("a/rot9") == "a/rot9"
