"""The episode sampler: shapes, labels, disjoint support/query, determinism, padding, errors."""

from __future__ import annotations

import pytest
import torch

from fewshot_cli.data.sampler import EpisodeSampler, storage_device
from fewshot_cli.data.store import ClassStore
from fewshot_cli.errors import FewshotError


def id_store(counts: list[int], width: int | None = None, size: int = 4) -> ClassStore:
    """Every image carries its (class, index) in two pixels; padding slots are marked 255."""
    width = width or max(counts)
    images = torch.full((len(counts), width, 1, size, size), 255, dtype=torch.uint8)
    for c, n in enumerate(counts):  # test setup, not a hot path
        images[c, :n, 0, 0, 0] = c
        images[c, :n, 0, 0, 1] = torch.arange(n)
    return ClassStore(images, [f"c{c}" for c in range(len(counts))],
                      torch.tensor(counts, dtype=torch.long))


def ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, index) of each image of ``[B, M, C, H, W]`` floats in [0, 1]."""
    raw = (x[:, :, 0, 0, :2] * 255).round().long()
    return raw[..., 0], raw[..., 1]


def test_shapes_labels_and_disjoint_support_query():
    store = id_store([20] * 12)
    ep = EpisodeSampler(store, ways=5, shots=3, queries=4, meta_batch=6, seed=1).sample()
    assert ep.support.shape == (6, 15, 1, 4, 4) and ep.query.shape == (6, 20, 1, 4, 4)
    assert ep.support.dtype == torch.float32 and ep.meta_batch == 6
    assert ep.support_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert ep.query_y[0].tolist() == sum(([c] * 4 for c in range(5)), [])
    sc, si = ids(ep.support)
    qc, qi = ids(ep.query)
    for b in range(6):
        # one true class per label, distinct classes within a task
        label_class = sc[b].view(5, 3)
        assert (label_class == label_class[:, :1]).all()
        assert label_class[:, 0].unique().numel() == 5
        assert torch.equal(qc[b].view(5, 4), label_class[:, :1].expand(5, 4))
        support = set(zip(sc[b].tolist(), si[b].tolist(), strict=True))
        query = set(zip(qc[b].tolist(), qi[b].tolist(), strict=True))
        assert len(support) == 15 and len(query) == 20 and not support & query


def test_same_seed_same_episodes_and_fixed_ignores_batch():
    store = id_store([20] * 10)
    a = EpisodeSampler(store, 5, 1, 2, meta_batch=2, seed=7)
    b = EpisodeSampler(store, 5, 1, 2, meta_batch=2, seed=7)
    for _ in range(3):
        ea, eb = a.sample(), b.sample()
        assert torch.equal(ea.support, eb.support) and torch.equal(ea.query, eb.query)
    assert not torch.equal(a.sample().support, EpisodeSampler(store, 5, 1, 2, 2, seed=8)
                           .sample().support)
    one = torch.cat([e.support for e in a.fixed(10, seed=3, batch=1)])
    four = torch.cat([e.support for e in b.fixed(10, seed=3, batch=4)])
    assert one.shape[0] == 10 and torch.equal(one, four)
    assert torch.equal(one, torch.cat([e.support for e in a.fixed(10, seed=3, batch=10)]))


def test_padding_and_uneven_counts_never_picked():
    store = id_store([3, 20, 5, 4, 6], width=20)
    sampler = EpisodeSampler(store, ways=4, shots=1, queries=2, meta_batch=50, seed=0)
    for _ in range(4):
        ep = sampler.sample()
        for x in (ep.support, ep.query):
            c, i = ids(x)
            assert (c < 5).all() and (i < store.counts[c]).all()


def test_impossible_episodes_fail_clearly():
    store = id_store([6, 6, 4])
    with pytest.raises(FewshotError, match=r"train\.ways=5 exceeds the 3 classes"):
        EpisodeSampler(store, ways=5, shots=1, queries=1)
    with pytest.raises(FewshotError, match=r"eval\.shots \+ eval\.queries = 5 exceeds the 4"):
        EpisodeSampler(store, ways=2, shots=1, queries=4, prefix="eval")
    with pytest.raises(FewshotError, match=r"train\.ways=1"):
        EpisodeSampler(store, ways=1, shots=1, queries=1)
    with pytest.raises(FewshotError, match="meta_batch=0"):
        EpisodeSampler(store, ways=2, shots=1, queries=1, meta_batch=0)


def test_a_split_too_big_for_the_gpu_stays_in_host_memory(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    assert storage_device(4 * 2**30, cuda) == cuda          # half of the free memory: resident
    assert storage_device(4 * 2**30 + 1, cuda) == torch.device("cpu")
    assert storage_device(10**12, torch.device("cpu")) == torch.device("cpu")


def drawn_store(groups: list[str], drawers: int = 6) -> ClassStore:
    """``id_store`` whose image ``i`` of class ``c`` was drawn by drawer ``(i + c) % drawers``."""
    store = id_store([drawers] * len(groups))
    index = torch.arange(drawers)
    who = torch.stack([(index + c) % drawers for c in range(len(groups))])
    return ClassStore(store.images, store.names, store.counts, groups, who)


def test_within_group_episodes_take_their_classes_from_one_group():
    groups = ["a"] * 6 + ["b"] * 5 + ["c"] * 2  # c is too small for 4-way episodes
    store = drawn_store(groups)
    sampler = EpisodeSampler(store, ways=4, shots=1, queries=1, meta_batch=200, seed=0,
                             within_group=True)
    classes, _ = ids(sampler.sample().support)
    chosen = [{groups[c] for c in row.tolist()} for row in classes]
    assert all(len(g) == 1 for g in chosen)
    seen = [g.pop() for g in chosen]
    assert set(seen) == {"a", "b"} and 60 < seen.count("a") < 140  # groups drawn uniformly
    one = torch.cat([e.support for e in sampler.fixed(6, seed=3, batch=1)])
    assert torch.equal(one, torch.cat([e.support for e in sampler.fixed(6, seed=3, batch=4)]))


def test_distinct_drawers_give_support_and_query_from_other_people():
    store = drawn_store(["a"] * 8)
    sampler = EpisodeSampler(store, ways=5, shots=2, queries=3, meta_batch=50, seed=1,
                             distinct_drawers=True)
    ep = sampler.sample()
    for x, count in ((ep.support, 2), (ep.query, 3)):
        c, i = ids(x)
        who = store.drawers[c, i].view(50, 5, count)  # [B, N, K or Q]
        assert (who == who[:, :1]).all()  # the i-th image of every class: the same drawer
    sc, si = ids(ep.support)
    qc, qi = ids(ep.query)
    support = store.drawers[sc, si].view(50, 5, 2)[:, 0]
    query = store.drawers[qc, qi].view(50, 5, 3)[:, 0]
    people = torch.cat([support, query], dim=1)  # [B, K+Q] drawers of each episode
    assert all(len(set(row.tolist())) == 5 for row in people)
    assert len({tuple(row.tolist()) for row in people}) > 10  # drawn anew per episode


def test_protocol_options_fail_clearly():
    plain = id_store([6] * 5)
    with pytest.raises(FewshotError, match=r"eval\.within_group=true needs classes in groups"):
        EpisodeSampler(plain, 2, 1, 1, prefix="eval", within_group=True)
    with pytest.raises(FewshotError, match=r"eval\.distinct_drawers=true needs to know who"):
        EpisodeSampler(plain, 2, 1, 1, prefix="eval", distinct_drawers=True)
    small = drawn_store(["a", "a", "b", "b", "b"])
    with pytest.raises(FewshotError, match=r"no group of the test split has 4 classes .the "
                                           r"largest has 3.; lower eval\.ways"):
        EpisodeSampler(small, 4, 1, 1, split="test", prefix="eval", within_group=True)
    gaps = drawn_store(["a"] * 4, drawers=6)
    gaps.drawers[0, :4] = -1  # the first class's first 4 drawers are unknown
    with pytest.raises(FewshotError, match="needs 3 drawers .* but only 2 did"):
        EpisodeSampler(gaps, 2, 1, 2, prefix="eval", distinct_drawers=True)
