"""The memory store: planted neighbours with every index kind, exclusions, per-item caps,
save/load and the config block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.retrieval import MemoryStore

H = 16
N_ITEMS = 40
PER_ITEM = 6


def planted(seed: int = 0):
    """Items 100..139, each a random unit direction; PER_ITEM entries per item near it."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(N_ITEMS, H)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    items = np.repeat(np.arange(N_ITEMS) + 100, PER_ITEM)
    keys = centers[items - 100] * 4 + rng.normal(scale=0.05, size=(items.size, H)).astype(np.float32)
    values = rng.normal(size=(items.size, H)).astype(np.float32)
    return centers, keys, values, items


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_planted_neighbours(index):
    centers, keys, values, items = planted()
    store = MemoryStore.build(keys, values, items, RetrievalConfig(index=index, top_k=PER_ITEM, nprobe=64))
    q = torch.from_numpy(centers[[3, 17, 39]])
    res = store.search(q)
    assert res.scores.shape == (3, PER_ITEM) and res.values.shape == (3, PER_ITEM, H)
    assert (res.items == torch.tensor([103, 117, 139])[:, None]).all()  # all entries of the planted item
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()
    # values are the stored values of the returned entries, in order
    assert torch.equal(res.values, torch.from_numpy(values)[res.entries])
    # with cosine similarity a query equal to one key finds that entry first
    cosine = MemoryStore.build(keys, values, items, RetrievalConfig(index=index, normalize=True, nprobe=64))
    assert cosine.search(torch.from_numpy(keys[[50, 51]]), k=1).entries.tolist() == [[50], [51]]


def test_exclusions():
    centers, keys, values, items = planted()
    store = MemoryStore.build(keys, values, items, RetrievalConfig(top_k=3, normalize=True))
    q = torch.from_numpy(keys[[7, 20]])
    plain = store.search(q, k=4)
    assert plain.entries[:, 0].tolist() == [7, 20]
    own = store.search(q, exclude_entries=torch.tensor([7, 20]))
    assert own.entries.tolist() == plain.entries[:, 1:].tolist()  # the next ones move up
    other = store.search(q, exclude_items=torch.tensor([items[7], -1]))
    assert (other.items[0] != items[7]).all() and other.mask.all()
    assert other.entries[1].tolist() == plain.entries[1, :3].tolist()  # -1 excludes nothing


def test_max_per_item_and_random_selection():
    _, keys, values, items = planted()
    first = MemoryStore.build(keys, values, items, RetrievalConfig(max_per_item=2))
    assert len(first) == 2 * N_ITEMS
    assert first.entry_ids[:4].tolist() == [0, 1, PER_ITEM, PER_ITEM + 1]  # first ones, input order
    assert np.array_equal(first.keys, keys[first.entry_ids])
    drawn = MemoryStore.build(keys, values, items, RetrievalConfig(max_per_item=2, sample_seed=5))
    counts = np.bincount(drawn.items - 100)
    assert (counts == 2).all() and not np.array_equal(drawn.entry_ids, first.entry_ids)
    # search reports entry ids of the caller's rows
    res = first.search(torch.from_numpy(keys[[PER_ITEM + 1]]), k=1)
    assert res.entries.item() == PER_ITEM + 1


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, index):
    _, keys, values, items = planted(1)
    store = MemoryStore.build(keys, values, items, RetrievalConfig(index=index, top_k=5, normalize=True, nprobe=2))
    q = torch.randn(8, H, generator=torch.Generator().manual_seed(0))
    before = store.search(q)
    loaded = MemoryStore.load(store.save(tmp_path / "store"))
    after = loaded.search(q)
    assert loaded.config == store.config
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_normalize_gives_cosine():
    _, keys, values, items = planted()
    store = MemoryStore.build(keys, values, items, RetrievalConfig(normalize=True, top_k=1))
    q = torch.from_numpy(keys[[9]]) * 10
    res = store.search(q)
    assert res.entries.item() == 9 and res.scores.item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(q, torch.from_numpy(keys[[9]]) * 10)  # the caller's query is untouched


def test_refresh_rebuilds():
    _, keys, values, items = planted()
    store = MemoryStore.build(keys, values, items, RetrievalConfig(top_k=1, normalize=True))
    store.refresh(-store.keys, store.values * 2)
    res = store.search(torch.from_numpy(-keys[[11]]))
    assert res.entries.item() == 11
    assert torch.equal(res.values[0, 0], torch.from_numpy(values[11]) * 2)


def test_errors():
    _, keys, values, items = planted()
    store = MemoryStore.build(keys, values, items)
    with pytest.raises(UserError, match=r"queries must be \[B, 16\]"):
        store.search(torch.zeros(2, H + 1))
    with pytest.raises(UserError, match="top_k=1000 but the store has 240 entries"):
        store.search(torch.zeros(2, H), k=1000)
    with pytest.raises(UserError, match="no entries"):
        MemoryStore.build(np.zeros((0, H)), np.zeros((0, H)), np.zeros(0))
    bad = keys.copy()
    bad[3, 2] = np.nan
    with pytest.raises(UserError, match="NaN or infinite"):
        MemoryStore.build(bad, values, items)
    with pytest.raises(UserError, match="same number of rows"):
        MemoryStore.build(keys, values[:-1], items)
    with pytest.raises(UserError, match="unknown key 'topk'; known keys: index, top_k"):
        RetrievalConfig.from_dict({"topk": 3})
    with pytest.raises(UserError, match="key 'index' must be one of flat, ivf, hnsw"):
        RetrievalConfig.from_dict({"index": "pq"})
    with pytest.raises(UserError, match="key 'top_k' must be an integer > 0"):
        RetrievalConfig.from_dict({"top_k": True})
    assert RetrievalConfig.from_dict({"max_per_item": None, "dropout": 0}).dropout == 0.0


def test_unfilled_slots_are_masked():
    """IVF searching one cell can return fewer than k: the rest is entry -1, score -inf, value 0."""
    centers, keys, values, items = planted()
    store = MemoryStore.build(keys, values, items, RetrievalConfig(index="ivf", nprobe=1, top_k=120))
    res = store.search(torch.from_numpy(centers[:2]))
    assert not res.mask.all() and res.mask[:, 0].all()
    empty = ~res.mask
    assert (res.items[empty] == -1).all() and torch.isinf(res.scores[empty]).all()
    assert (res.values[empty] == 0).all()
    store.set_search_params(nprobe=64)  # every cell: all slots filled
    assert store.search(torch.from_numpy(centers[:2])).mask.all()
    with pytest.raises(UserError, match="cannot change nlist after building"):
        store.set_search_params(nlist=4)
