"""Large catalogs: the ivf_pq memory store (planted neighbours, exact re-scoring, save/load, the
automatic cell count and code size) and the synthetic generator at 10k items."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.faiss_index import auto_pq_m, ivf_cells
from lotcrs_plugin.model.retrieval import MemoryStore


def clustered(n_items: int = 300, per_item: int = 8, h: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_items, h)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    items = np.repeat(np.arange(n_items), per_item)
    keys = centers[items] + rng.normal(scale=0.1, size=(items.size, h)).astype(np.float32)
    return centers, keys, items


def test_ivf_pq_finds_planted_neighbours_with_exact_scores(tmp_path):
    centers, keys, items = clustered()
    values = np.arange(len(keys), dtype=np.float32)[:, None].repeat(3, 1)
    store = MemoryStore.build(keys, values, items, RetrievalConfig(index="ivf_pq", top_k=8, normalize=True,
                                                                   max_per_item=None, nprobe=8))
    assert store.describe().startswith("ivf_pq: nlist 37, nprobe 8, PQ 4x4 bit")  # 0.75 sqrt(2400) cells
    q = torch.from_numpy(centers[[5, 77, 299]])
    res = store.search(q)
    assert (res.items == torch.tensor([5, 77, 299])[:, None]).all()
    # the scores are the exact cosine similarities, best first
    exact = np.einsum("bkh,bh->bk", store.keys[res.entries.numpy()], q.numpy() / np.linalg.norm(q.numpy(), axis=1,
                                                                                                  keepdims=True))
    np.testing.assert_allclose(res.scores.numpy(), exact, rtol=1e-5, atol=1e-6)
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()
    assert torch.equal(res.values[..., 0], res.entries.float())
    # exclusions still leave k results; the store survives a save / load with its parameters
    other = store.search(q, exclude_items=torch.tensor([5, 77, 299]))
    assert other.mask.all() and (other.items != torch.tensor([5, 77, 299])[:, None]).all()
    loaded = MemoryStore.load(store.save(tmp_path / "store"))
    for a, b in zip(res, loaded.search(q)):
        assert torch.equal(a, b)
    loaded.set_search_params(refine_factor=1, nprobe=37)
    assert loaded.describe().endswith("nprobe 37, PQ 4x4 bit, refine x1")


def test_ivf_pq_refinement_recovers_flat_recall():
    """The compressed codes only pick candidates: re-scoring more of them brings the exact
    neighbours back, all of them when every key is a candidate."""
    _, keys, items = clustered(n_items=400, per_item=5, h=48, seed=1)
    queries = torch.from_numpy(keys[::37] + np.random.default_rng(2).normal(scale=0.05, size=keys[::37].shape)
                               .astype(np.float32))
    flat = MemoryStore.build(keys, keys, items, RetrievalConfig(index="flat", top_k=10, normalize=True,
                                                                max_per_item=None))
    want = flat.search(queries).entries.numpy()
    pq = MemoryStore.build(keys, keys, items, RetrievalConfig(index="ivf_pq", top_k=10, normalize=True,
                                                              max_per_item=None, nprobe=1000, refine_factor=1))
    recalls = []
    for factor in (1, 8, 200):  # 200 x 10 candidates: every key
        pq.set_search_params(refine_factor=factor)
        got = pq.search(queries)
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got.entries.numpy())]))
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] >= 0.99


def test_automatic_cells_and_code_size():
    assert ivf_cells(0, 2_000_000) == 5657 and ivf_cells(0, 100_000) == 1265
    assert ivf_cells(0, 1000) == 25 and ivf_cells(4096, 1000) == 25 and ivf_cells(0, 10) == 1
    assert ivf_cells(2048, 2_000_000) == 2048 and ivf_cells(0, 2_000_000, "ivf_pq") == 1061
    assert auto_pq_m(384) == 48 and auto_pq_m(768) == 96 and auto_pq_m(64) == 8 and auto_pq_m(100) == 10
    assert auto_pq_m(5) == 1
    assert RetrievalConfig().nlist == 0
    with pytest.raises(UserError, match="key 'nlist' must be an integer >= 0"):
        RetrievalConfig.from_dict({"nlist": -1})
    with pytest.raises(UserError, match="key 'refine_factor' must be an integer > 0"):
        RetrievalConfig.from_dict({"refine_factor": 0})
    _, keys, items = clustered(n_items=60, per_item=4)
    with pytest.raises(UserError, match="pq_m 5 must divide the key size 32"):
        MemoryStore.build(keys, keys, items, RetrievalConfig(index="ivf_pq", pq_m=5))


def test_synthetic_generator_at_10k_items(tmp_path):
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.generator import generate

    cfg = SyntheticConfig(n_items=10_000, n_conversations=2_000, n_people=2_000, seed=1)
    start = time.perf_counter()
    folder = generate(cfg, tmp_path / "syn")
    assert time.perf_counter() - start < 20
    stats = json.loads((folder / "item_stats.json").read_text(encoding="utf-8"))
    assert len(stats) == 10_000 and len({s["name"] for s in stats.values()}) == 10_000
    counts = np.sort(np.array([s["source_mentions"] for s in stats.values()]))[::-1]
    # Zipf-shaped: the top 1% of items hold far more mentions than the bottom half
    assert counts[:100].sum() > 5 * counts[5000:].sum() and counts[-1] == 0
    attrs = json.loads((folder / "item_attributes.json").read_text(encoding="utf-8"))
    assert len(attrs) == 10_000 and all(a["genre"] and a["director"] for a in attrs.values())


def test_json_list_is_streamed_in_chunks_with_line_numbers(tmp_path):
    from lotcrs_plugin.data.simulator.mining import iter_json_list

    dialogs = [{"conv_id": f"c{i}", "dialog": [{"text": "x" * (i % 7), "n": i * 1.5}]} for i in range(40)]
    path = tmp_path / "train_data.json"
    path.write_text("[\n" + ",\n".join(json.dumps(d) for d in dialogs) + "\n]\n", encoding="utf-8")
    for chunk in (7, 64, 1 << 20):  # elements cut by chunk ends everywhere
        assert list(iter_json_list(path, chunk=chunk)) == dialogs
        assert list(iter_json_list(path, limit=5, chunk=chunk)) == dialogs[:5]
    (tmp_path / "num.json").write_text("[1234567, 2]", encoding="utf-8")
    assert list(iter_json_list(tmp_path / "num.json", chunk=3)) == [1234567, 2]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"a": 1},\n{"a": 2,,}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.json:3: malformed JSON"):
        list(iter_json_list(bad, chunk=4))
    (tmp_path / "obj.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(UserError, match=r"obj.json:1: expected a JSON list"):
        list(iter_json_list(tmp_path / "obj.json"))


def test_mining_reads_only_the_first_dialogs(tmp_path):
    from lotcrs_plugin.data.catalog import Catalog
    from lotcrs_plugin.data.simulator import SimulationConfig
    from lotcrs_plugin.data.simulator.mining import mine_templates
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.generator import generate

    folder = generate(SyntheticConfig(n_items=60, n_conversations=300, seed=2), tmp_path / "s")
    catalog = Catalog.from_folder(folder)
    _, everything = mine_templates(catalog, folder)
    _, first = mine_templates(catalog, folder, max_dialogs=20)
    assert first["turns"] == 20 * 8 and everything["turns"] == 240 * 8  # 8 turns each; 240 in training
    # the default cap is left out of the simulation's cache key; another value is part of it
    assert "mine_max_dialogs" not in SimulationConfig().key_dict()
    assert SimulationConfig.from_dict({"mine_max_dialogs": 0}).key_dict()["mine_max_dialogs"] == 0
    with pytest.raises(UserError, match="mine_max_dialogs"):
        SimulationConfig.from_dict({"mine_max_dialogs": -1})


def test_synthetic_conversations_grow_with_the_catalog():
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig

    default = SyntheticConfig()
    assert default.n_conversations == 600 and default == SyntheticConfig(n_conversations=600)
    assert default.key() == SyntheticConfig(n_items=200, n_conversations=600).key()
    assert SyntheticConfig.from_dict({"n_items": 100_000}).n_conversations == 300_000
    assert SyntheticConfig(n_items=60).n_conversations == 600
    assert SyntheticConfig(n_items=10_000, n_conversations=2_000).n_conversations == 2_000
