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
