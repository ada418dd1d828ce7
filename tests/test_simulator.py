"""The balanced-data simulator (lotcrs_plugin.data.simulator) on a small dataset folder written
here, and on the real ReDial files where they exist."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lotcrs_plugin.data.catalog import Catalog, attribute_display_name, item_display_name
from lotcrs_plugin.data.simulator import SimulationConfig, iter_simulated, load_simulated, load_stats, simulate
from lotcrs_plugin.data.simulator.core import gini
from lotcrs_plugin.data.simulator.mining import mine_templates
from lotcrs_plugin.data.simulator.templates import BASE_SLOTS, load_template_file
from lotcrs_plugin.data.simulator.threads import ThreadSampler
from lotcrs_plugin.errors import UserError

from support import SHARED_DATA

from simulator_data import ITEMS, NAMES, write_dataset


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "tiny")


def _target_of(dialog: dict) -> str:
    return dialog["conv_id"].split("-")[1]


# ---------------------------------------------------------------------------- catalog

def test_catalog_reads_kg_and_attribute_file_alike(tmp_path):
    a = Catalog.from_folder(write_dataset(tmp_path / "kg"))
    b = Catalog.from_folder(write_dataset(tmp_path / "attrs", attributes_file=True))
    for c in (a, b):
        assert c.n_items == len(ITEMS)
        assert c.kinds == ["genre", "star", "director"]
        assert c.attributes_of(0, "star") == ["Alma Reyes", "Boris Quill"]
        assert c.attributes_of(NAMES.index("Lonely Satellite (2019)")) == []
        assert c.popularity[NAMES.index("Midnight Harbor (1999)")] == 1
    # attributes of the file are linked to the entities of the same name
    assert b.attr_entity_names[b.attr_names.index("Alma Reyes")] == "Alma Reyes"
    # the inverse index: items having "Cora Lind"
    cora = a.attr_names.index("Cora Lind")
    items = a.attr_item_indices[a.attr_item_indptr[cora]:a.attr_item_indptr[cora + 1]]
    assert sorted(a.item_names[i] for i in items) == ["Midnight Harbor (1999)", "Velvet Storm (2011)"]


def test_display_names_of_dbpedia_entities():
    assert item_display_name("<http://dbpedia.org/resource/Joker_(2019_film)>") == "Joker (2019)"
    assert item_display_name("<http://dbpedia.org/resource/Hoffa_(film)>") == "Hoffa"
    assert item_display_name("Star Wars [204292]") == "Star Wars"
    assert attribute_display_name("<http://dbpedia.org/resource/Chris_Evans_(actor)>", "star") == "Chris Evans"
    assert attribute_display_name("<http://dbpedia.org/resource/Action_film>", "genre") == "action"
    assert attribute_display_name("Dune (genre)", "genre") == "dune"


def test_a_catalog_without_any_attribute_still_simulates(tmp_path):
    folder = write_dataset(tmp_path / "bare")
    (folder / "entity_kg.json").write_text("[]")
    c = Catalog.from_folder(folder)
    assert c.kinds == [] and c.n_attributes == 0
    out = simulate(folder, SimulationConfig(per_item=2), out_dir=tmp_path / "s")
    dialogs = load_simulated(out)
    assert len(dialogs) == 2 * len(ITEMS)
    assert all(len(d["dialog"]) == 4 for d in dialogs)


def test_missing_file_is_a_user_error(tmp_path):
    folder = write_dataset(tmp_path / "d")
    (folder / "item_ids.json").unlink()
    with pytest.raises(UserError, match="item_ids.json"):
        simulate(folder, SimulationConfig(per_item=1))


# ---------------------------------------------------------------------------- balance, seed

def test_balance_is_exact_and_every_item_is_a_target(dataset, tmp_path):
    cfg = SimulationConfig(per_item=7, seed=1)
    out = simulate(dataset, cfg, out_dir=tmp_path / "sim")
    dialogs = load_simulated(out)
    entity2id = json.loads((dataset / "entity2id.json").read_text())
    assert len(dialogs) == 7 * len(ITEMS)
    by_id = Counter(_target_of(d) for d in dialogs)
    assert by_id == Counter({str(entity2id[n]): 7 for n in NAMES})
    # the recommendation turn names the target: count targets from the text, not the ids
    recommended = Counter(next(t for t in reversed(d["dialog"]) if t["movies"])["movies"][0] for d in dialogs)
    assert recommended == Counter({n: 7 for n in NAMES})
    stats = load_stats(out)
    assert stats["gini_target_frequency"] == 0.0
    assert stats["conversations_per_item"] == {"min": 7, "max": 7, "mean": 7.0}
    assert stats["items_with_exactly_per_item"] == len(ITEMS)
    assert stats["gini_real_train_mentions"] > 0.3
    assert set(stats["conversations_per_item_by_entity_id"].values()) == {7}
    assert stats["turns"] == sum(len(d["dialog"]) for d in dialogs)
    # the streaming reader gives the same dialogs
    assert list(iter_simulated(out)) == dialogs


def test_dialogs_have_the_layout_format(dataset, tmp_path):
    out = simulate(dataset, SimulationConfig(per_item=3), out_dir=tmp_path / "sim")
    entity2id = json.loads((dataset / "entity2id.json").read_text())
    items = set(NAMES)
    for d in load_simulated(out):
        assert set(d) == {"conv_id", "dialog"}
        roles = [t["role"] for t in d["dialog"]]
        assert roles == ["Seeker", "Recommender"] * (len(roles) // 2)   # alternating, Seeker first
        for i, t in enumerate(d["dialog"]):
            assert list(t) == ["utt_id", "role", "text", "raw_text", "movies", "entity", "word"]
            assert t["utt_id"] == i
            assert t["text"] and all(isinstance(w, str) and w == w.lower() for w in t["text"])
            assert all(m in items for m in t["movies"])
            assert all(e in entity2id and e not in items for e in t["entity"])
            for name in t["movies"] + t["entity"]:
                assert name.lower() in t["raw_text"].lower()


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    a = simulate(dataset, SimulationConfig(per_item=5, seed=11), out_dir=tmp_path / "a")
    b = simulate(dataset, SimulationConfig(per_item=5, seed=11), out_dir=tmp_path / "b")
    c = simulate(dataset, SimulationConfig(per_item=5, seed=12), out_dir=tmp_path / "c")
    data = [(p / "simulated_data.json").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_cache_is_keyed_by_inputs(dataset, tmp_path):
    cfg = SimulationConfig(per_item=2, cache_dir=str(tmp_path / "cache"))
    first = simulate(dataset, cfg)
    stamp = (first / "simulated_data.json").stat().st_mtime_ns
    again = simulate(dataset, SimulationConfig(per_item=2, cache_dir=str(tmp_path / "cache")))
    assert again == first and (again / "simulated_data.json").stat().st_mtime_ns == stamp
    other = simulate(dataset, SimulationConfig(per_item=3, cache_dir=str(tmp_path / "cache")))
    assert other != first and other.parent == first.parent
    assert first.name.startswith("tiny-")
    # a changed dataset file is a new input
    kg = dataset / "entity_kg.json"
    kg.write_text(kg.read_text() + " ")
    assert simulate(dataset, cfg) != first


def test_out_dir_refuses_a_foreign_folder(dataset, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not made by the simulator"):
        simulate(dataset, SimulationConfig(per_item=1), out_dir=foreign)


# ---------------------------------------------------------------------------- threads

def test_thread_elements_lead_to_the_target_which_comes_last(dataset):
    c = Catalog.from_folder(dataset)
    sampler = ThreadSampler(c, np.array([1.0, 1.0, 1.0, 1.0]), np.ones(len(c.kinds)))
    targets = np.repeat(np.arange(c.n_items), 50)
    th = sampler.sample(targets, np.random.default_rng(0), 1, 3)
    bare = NAMES.index("Lonely Satellite (2019)")
    for b in range(len(targets)):
        t = int(targets[b])
        seq = th.sequence(b, c)
        assert seq[-1] == ("item", c.item_names[t])
        own = set(c.attributes_of(t))
        elements = seq[:-1]
        assert len(elements) == th.length[b] and len(set(elements)) == len(elements)
        if t == bare:
            assert elements == []
            continue
        assert 1 <= len(elements) <= 3
        kinds = [k for k, _ in elements]
        assert kinds == sorted(kinds, key=lambda k: k != "genre")   # genres first
        for kind, name in elements:
            if kind == "item":   # a related item shares an attribute with the target
                assert name != c.item_names[t]
                assert own & set(c.attributes_of(c.item_names.index(name)))
            else:
                assert name in c.attributes_of(t, kind)
    # every element kind is used
    assert set(th.slot[th.slot >= 0].tolist()) == {0, 1, 2, 3}


def test_dialog_follows_its_thread(dataset, tmp_path):
    """Seeker preferences name the target's attributes or related items; the recommendation
    comes last among the item mentions and names the target."""
    out = simulate(dataset, SimulationConfig(per_item=20, mined_template_share=0.0), out_dir=tmp_path / "s")
    c = Catalog.from_folder(dataset)
    entity2id = json.loads((dataset / "entity2id.json").read_text())
    name_of = {str(i): n for n, i in entity2id.items()}
    for d in load_simulated(out):
        target = name_of[_target_of(d)]
        t = c.item_names.index(target)
        own = set(c.attributes_of(t))
        mentions = [(turn["role"], m) for turn in d["dialog"] for m in turn["movies"]]
        assert mentions[-1] == ("Recommender", target)
        for turn in d["dialog"][:-3]:
            assert turn["role"] == "Seeker" or not (turn["movies"] or turn["entity"])
            for e in turn["entity"]:
                assert e in own
            for m in turn["movies"]:
                assert m != target and own & set(c.attributes_of(c.item_names.index(m)))


def test_items_without_attributes_get_conversations(dataset, tmp_path):
    out = simulate(dataset, SimulationConfig(per_item=4), out_dir=tmp_path / "s")
    bare = [d for d in load_simulated(out)
            if any("Lonely Satellite (2019)" in t["movies"] for t in d["dialog"])]
    assert len(bare) == 4
    for d in bare:
        assert [t["role"] for t in d["dialog"]] == ["Seeker", "Recommender", "Seeker", "Recommender"]
        assert d["dialog"][1]["movies"] == ["Lonely Satellite (2019)"]
    stats = load_stats(out)
    assert stats["items_without_attributes"] == 1
    assert stats["thread_length_before_target"]["0"] >= 4


# ---------------------------------------------------------------------------- templates

def test_mined_templates_have_known_slots_and_no_leftover_names(dataset):
    c = Catalog.from_folder(dataset)
    templates, report = mine_templates(c, dataset)
    texts = [t.text for t in templates]
    assert "I really enjoy [genre] movies." in texts
    assert "Have you seen [item]? It is great." in texts
    assert "Then try [item], [star] is great in it." in texts
    assert "I would recommend [item], a lovely [genre]." in texts
    # the unlinked star and the unlinked title made their turns unusable
    assert report["leftover_name"] >= 2
    assert not any("Boris" in t or "Crimson" in t for t in texts)
    names = c.item_names + [re.sub(r" \(\d{4}\)$", "", n) for n in c.item_names] + c.attr_names
    for t in templates:
        assert t.source == "mined"
        assert all(s in BASE_SLOTS for s in t.slots)
        for name in names:
            assert not re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", t.text, re.IGNORECASE), (name, t.text)
    acts = Counter(t.act for t in templates)
    assert acts["open"] >= 1 and acts["ask"] >= 1 and acts["close_seeker"] >= 1 and acts["recommend"] >= 2


def test_mined_share_is_configurable(dataset, tmp_path):
    none = simulate(dataset, SimulationConfig(per_item=20, mined_template_share=0.0), out_dir=tmp_path / "a")
    some = simulate(dataset, SimulationConfig(per_item=20, mined_template_share=1.0), out_dir=tmp_path / "b")
    assert load_stats(none)["mined_template_share"]["turns"] == 0.0
    # pools with fewer than MIN_MINED_POOL mined templates draw them proportionally less
    assert load_stats(some)["mined_template_share"]["turns"] > 0.1
    text = (some / "simulated_data.json").read_text()
    assert "Then try" in text   # a mined recommendation filled in


def test_template_with_unknown_slot_is_rejected(dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefer:\n  - I love [genre] movies.\n  - I adore [actor_name] so much.\n")
    with pytest.raises(UserError) as err:
        load_template_file(bad, BASE_SLOTS)
    msg = str(err.value)
    assert "[actor_name]" in msg and "known slots" in msg and "[star]" in msg and f"{bad}:3" in msg
    # and through simulate
    with pytest.raises(UserError, match="actor_name"):
        simulate(dataset, SimulationConfig(per_item=1, templates=str(bad)), out_dir=tmp_path / "s")


@pytest.mark.parametrize("content, expected", [
    ("greet:\n  - Hi!\n", "unknown act 'greet'"),
    ("prefer:\n  - I like [genre] and [star].\n", "exactly one slot"),
    ("recommend:\n  - Watch [star].\n", "one [item]"),
    ("open:\n  - Hi [item]!\n", "takes no slot"),
    ("ask:\n  - What [genre?\n", "unbalanced"),
    ("ask:weather:\n  - Sunny?\n", "unknown kind 'weather'"),
])
def test_malformed_templates_are_rejected(tmp_path, content, expected):
    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_template_file(path, BASE_SLOTS)
    assert expected in str(err.value)


def test_template_file_adds_templates(dataset, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("recommend:\n  - Zebra pick [item], %100 sure.\n")
    out = simulate(dataset, SimulationConfig(per_item=30, templates=str(extra), mined_template_share=0.0),
                   out_dir=tmp_path / "s")
    dialogs = load_simulated(out)
    used = [t for d in dialogs for t in d["dialog"] if t["raw_text"].startswith("Zebra pick")]
    assert used and used[0]["text"][:2] == ["zebra", "pick"] and "%100" in used[0]["raw_text"]


# ---------------------------------------------------------------------------- config

def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(UserError) as err:
        SimulationConfig.from_dict({"per_itme": 3})
    assert "per_itme" in str(err.value) and "per_item" in str(err.value) and "mined_template_share" in str(err.value)
    with pytest.raises(UserError, match="'per_item' must be an integer"):
        SimulationConfig.from_dict({"per_item": "3"})
    with pytest.raises(UserError, match="mined_template_share"):
        SimulationConfig.from_dict({"mined_template_share": 1.5})
    with pytest.raises(UserError, match="thread_max_length"):
        SimulationConfig.from_dict({"thread_min_length": 4, "thread_max_length": 2})
    cfg = SimulationConfig.from_dict({"per_item": 3, "kind_mix": {"item": 0, "genre": 2}})
    assert cfg.per_item == 3 and cfg.kind_mix == {"item": 0, "genre": 2}
    assert SimulationConfig.from_dict(None) == SimulationConfig()


def test_unknown_kind_in_mix_names_the_known_ones(dataset, tmp_path):
    with pytest.raises(UserError) as err:
        simulate(dataset, SimulationConfig(per_item=1, kind_mix={"actor": 1.0}), out_dir=tmp_path / "s")
    assert "'actor'" in str(err.value) and "star" in str(err.value)


def test_kind_mix_steers_the_threads(dataset, tmp_path):
    out = simulate(dataset, SimulationConfig(per_item=10, kind_mix={"director": 1.0}), out_dir=tmp_path / "s")
    used = load_stats(out)["thread_elements_by_kind"]
    assert used["director"] > 0 and used["item"] == used["genre"] == used["star"] == 0


def test_gini():
    assert gini(np.full(10, 20)) == 0.0
    assert gini(np.array([0, 0, 0, 100])) == pytest.approx(0.75)


# ---------------------------------------------------------------------------- command line

def _cli(argv: list[str]) -> int:
    from lotcrs_plugin.commands import simulate as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_command_with_a_run_config(tmp_path, capsys, monkeypatch):
    # its own root: the folder lacks the splits a run needs, which later tests' registry would trip on
    home = tmp_path / "home"
    monkeypatch.setenv("LOTCRS_HOME", str(home))
    write_dataset(home / "data" / "dataset" / "tinycli")
    config = tmp_path / "run.yaml"
    config.write_text("dataset: tinycli\nmodel: whatever\nsimulation:\n  per_item: 2\n  seed: 5\n")
    assert _cli(["--config", str(config), "--per-item", "3", "--show", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "simulated 30 conversations (3 per item" in out
    assert out.count("[sim-") == 2 and "Recommender" in out
    assert (home / "data" / "simulated").is_dir()
    assert _cli(["--config", str(config), "--per-item", "3", "--quiet"]) == 0
    assert "found in the cache" in capsys.readouterr().out


def test_command_with_a_dataset_dir_and_errors(dataset, tmp_path, capsys):
    assert _cli(["--dataset-dir", str(dataset), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert (tmp_path / "o" / "simulated_data.json").is_file()
    with pytest.raises(UserError, match="--dataset-dir"):
        _cli(["--quiet"])
    config = tmp_path / "run.yaml"
    config.write_text("dataset: nowhere\n")
    with pytest.raises(UserError, match="import-data"):
        _cli(["--config", str(config)])
    config.write_text("dataset: tiny\nsimulation:\n  colour: red\n")
    with pytest.raises(UserError, match="unknown key 'colour'"):
        _cli(["--config", str(config), "--dataset-dir", str(dataset)])


# ---------------------------------------------------------------------------- real data

REDIAL = SHARED_DATA / "redial"


@pytest.mark.skipif(not (REDIAL / "train_partial.jsonl").is_file(), reason="ReDial files not on this machine")
def test_real_redial_catalog_is_balanced_and_mined_cleanly(tmp_path):
    from lotcrs_plugin.data.importers import import_dataset

    folder = tmp_path / "redial_partial"
    import_dataset("redial", REDIAL / "train_partial.jsonl", name="redial_partial", out=folder,
                   movies=REDIAL / "movies_with_mentions.csv", attributes=REDIAL / "movie_attributes.json")
    c = Catalog.from_folder(folder)
    assert c.n_items == 6924 and {"genre", "star", "director", "writer"} <= set(c.kinds)
    templates, report = mine_templates(c, folder)
    assert report["kept"] > 1000
    out = simulate(folder, SimulationConfig(per_item=1), out_dir=tmp_path / "sim")
    stats = load_stats(out)
    assert stats["conversations"] == 6924 and stats["gini_target_frequency"] == 0.0
    assert stats["items_never_mentioned_in_train"] > 4000
    assert stats["mined_template_share"]["turns"] > 0.3
    # no turn names a genre ("scary", "funny" too), person or title outside its thread
    from lotcrs_plugin.data.simulator.consistency import ThreadChecker

    check = ThreadChecker(c).check_folder(out)
    assert check["turns"] == stats["turns"] and check["contradicting_turns"] == 0, check["examples"]
