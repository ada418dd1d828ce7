"""The synthetic dataset generator: layout, determinism, long tail, cache, config (no torch)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from lotcrs_plugin.data.synthetic.config import SyntheticConfig
from lotcrs_plugin.data.synthetic.dataset import ensure_generated
from lotcrs_plugin.data.synthetic.generator import generate
from lotcrs_plugin.data.synthetic.templates import tokenize
from lotcrs_plugin.errors import UserError

LAYOUT_FILES = ("dataset.json", "train_data.json", "valid_data.json", "test_data.json",
                "token2id.json", "entity2id.json", "word2id.json", "entity_kg.json", "word_kg.json",
                "item_ids.json", "item_stats.json", "item_attributes.json")


def load(folder: Path, name: str):
    with open(folder / name, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def default_folder(tmp_path_factory) -> Path:
    return generate(SyntheticConfig(), tmp_path_factory.mktemp("syn") / "default")


def test_default_generation_is_fast_and_writes_the_layout(tmp_path):
    t0 = time.perf_counter()
    folder = generate(SyntheticConfig(), tmp_path / "x")
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"default generation took {elapsed:.2f} s"
    assert sorted(p.name for p in folder.iterdir()) == sorted(LAYOUT_FILES)
    meta = load(folder, "dataset.json")
    assert meta["format"] == "lotcrs-processed" and meta["format_version"] == 1
    assert meta["name"] == "synthetic" and meta["language"] == "en"
    assert meta["source"]["config"]["n_items"] == 200
    for split in ("train", "valid", "test"):
        assert len(load(folder, f"{split}_data.json")) == meta["splits"][split] > 0


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = SyntheticConfig(n_items=60, n_conversations=80, seed=7)
    a, b = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b")
    for name in LAYOUT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = generate(SyntheticConfig(n_items=60, n_conversations=80, seed=8), tmp_path / "c")
    assert (a / "train_data.json").read_bytes() != (c / "train_data.json").read_bytes()
    assert (a / "entity2id.json").read_bytes() != (c / "entity2id.json").read_bytes()


def mention_counts(folder: Path) -> np.ndarray:
    stats = load(folder, "item_stats.json")
    return np.array([s["train_mentions"] for s in stats.values()])


def top_decile_share(counts: np.ndarray) -> float:
    ranked = np.sort(counts)[::-1]
    return ranked[: len(ranked) // 10].sum() / ranked.sum()


def test_item_mentions_are_long_tailed(default_folder, tmp_path):
    counts = mention_counts(default_folder)
    assert top_decile_share(counts) > 0.4
    assert np.sort(counts)[::-1][0] > 10 * max(1, np.median(counts))
    # the exponent drives it: uniform popularity has no head
    flat = generate(SyntheticConfig(zipf_exponent=0.0), tmp_path / "flat")
    assert top_decile_share(mention_counts(flat)) < 0.25


def test_train_mentions_match_the_train_dialogs(default_folder):
    stats = load(default_folder, "item_stats.json")
    entity2id = load(default_folder, "entity2id.json")
    counted: dict[int, int] = {}
    for conv in load(default_folder, "train_data.json"):
        for turn in conv["dialog"]:
            for movie in turn["movies"]:
                counted[entity2id[movie]] = counted.get(entity2id[movie], 0) + 1
    assert {int(k): v["train_mentions"] for k, v in stats.items() if v["train_mentions"]} == counted
    assert all(v["source_mentions"] >= v["train_mentions"] for v in stats.values())
    counted_rec: dict[int, int] = {}
    for conv in load(default_folder, "train_data.json"):
        for turn in conv["dialog"]:
            if turn["role"] == "Recommender":
                for movie in turn["movies"]:
                    counted_rec[entity2id[movie]] = counted_rec.get(entity2id[movie], 0) + 1
    assert {int(k): v["train_rec_mentions"] for k, v in stats.items() if v["train_rec_mentions"]} == counted_rec
    assert 0 < sum(counted_rec.values()) < sum(counted.values())


def test_splits_nonempty_and_every_mention_resolves(default_folder):
    entity2id = load(default_folder, "entity2id.json")
    items = set(load(default_folder, "item_ids.json"))
    token2id = load(default_folder, "token2id.json")
    word2id = load(default_folder, "word2id.json")
    assert len(items) == 200 and min(entity2id.values()) == 1
    assert [token2id[t] for t in ("__pad__", "__start__", "__end__", "__unk__")] == [0, 1, 2, 3]
    labels = 0
    for split in ("train", "valid", "test"):
        dialogs = load(default_folder, f"{split}_data.json")
        assert dialogs
        for conv in dialogs:
            roles = [t["role"] for t in conv["dialog"]]
            assert roles[0] == "Seeker" and all(r != s for r, s in zip(roles, roles[1:]))
            assert any(t["movies"] for t in conv["dialog"] if t["role"] == "Recommender")
            for turn in conv["dialog"]:
                assert turn["text"] == tokenize(turn["raw_text"])
                assert all(t in token2id for t in turn["text"])
                for movie in turn["movies"]:
                    assert entity2id[movie] in items and movie in turn["raw_text"]
                    labels += split != "train"
                for ent in turn["entity"]:
                    assert ent in entity2id and entity2id[ent] not in items
                    assert ent.lower() in turn["raw_text"].lower()
                assert all(w in word2id and w in turn["text"] for w in turn["word"])
    assert labels > 0


def test_kg_links_items_to_their_attributes(default_folder):
    entity2id = load(default_folder, "entity2id.json")
    id2entity = {i: e for e, i in entity2id.items()}
    attrs = load(default_folder, "item_attributes.json")
    kg = load(default_folder, "entity_kg.json")
    from_kg: dict[tuple[int, str], set[str]] = {}
    for h, r, t in kg:
        from_kg.setdefault((h, r), set()).add(id2entity[t])
    for eid, a in attrs.items():
        for rel in ("genre", "director", "star", "writer"):
            assert from_kg[(int(eid), rel)] == set(a[rel])
    assert load(default_folder, "word_kg.json")
    # CRSLab's TextCNN embeds tokens with an n_entity-sized table
    assert len(load(default_folder, "token2id.json")) <= max(entity2id.values()) + 1


def test_cache_generates_once_into_a_keyed_folder(tmp_path):
    cfg = SyntheticConfig(n_items=60, n_conversations=50)
    root = tmp_path / "data" / "dataset"
    folder = ensure_generated(cfg, root)
    assert folder == root / "synthetic" / cfg.key()
    stamp = (folder / "train_data.json").stat().st_mtime_ns
    assert ensure_generated(cfg, root) == folder
    assert (folder / "train_data.json").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [cfg.key()]  # no temporary left
    other = SyntheticConfig(n_items=60, n_conversations=50, seed=1)
    assert other.key() != cfg.key() and len(cfg.key()) == 12


def test_large_catalog_names_stay_unique(tmp_path):
    folder = generate(SyntheticConfig(n_items=3000, n_people=2000, n_conversations=50), tmp_path / "l")
    entity2id = load(folder, "entity2id.json")
    assert len(entity2id) == 3000 + 12 + 2000


def test_config_unknown_key_lists_known_keys():
    with pytest.raises(UserError) as e:
        SyntheticConfig.from_dict({"n_itmes": 10})
    msg = str(e.value)
    assert "n_itmes" in msg and "n_items" in msg and "zipf_exponent" in msg and "seed" in msg


@pytest.mark.parametrize("bad, key", [
    ({"n_items": "200"}, "n_items"),
    ({"n_items": 20.5}, "n_items"),
    ({"seed": True}, "seed"),
    ({"zipf_exponent": "steep"}, "zipf_exponent"),
    ({"n_items": 10}, "n_items"),
    ({"turns": 2}, "turns"),
    ({"n_genres": 99}, "n_genres"),
    ({"valid_fraction": 1.5}, "valid_fraction"),
    ({"n_conversations": 3}, "n_conversations"),
])
def test_config_bad_values_name_the_key(bad, key):
    with pytest.raises(UserError, match=key):
        SyntheticConfig.from_dict(bad)


def test_config_defaults_and_overrides():
    assert SyntheticConfig.from_dict(None) == SyntheticConfig()
    cfg = SyntheticConfig.from_dict({"n_items": 80, "zipf_exponent": 2, "seed": 3})
    assert (cfg.n_items, cfg.zipf_exponent, cfg.seed) == (80, 2.0, 3)
    assert isinstance(cfg.zipf_exponent, float)
