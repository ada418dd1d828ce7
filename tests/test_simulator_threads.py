"""Simulated dialogs keep to their own thread: no turn names a genre, person or title that is
not the target's (or a listed related item's). Mined templates keep no attribute word of the
dialog they were mined from; built-in and file templates say none outside their slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.simulator import SimulationConfig, load_stats, simulate
from lotcrs_plugin.data.simulator import core
from lotcrs_plugin.data.simulator.consistency import ThreadChecker
from lotcrs_plugin.data.simulator.mentions import NameMatcher
from lotcrs_plugin.data.simulator.mining import mine_templates
from lotcrs_plugin.data.simulator.templates import builtin_templates
from lotcrs_plugin.data.synthetic.config import SyntheticConfig
from lotcrs_plugin.data.synthetic.generator import generate
from lotcrs_plugin.errors import UserError

from simulator_data import TRAIN, write_dataset
from simulator_data import turn as _turn

# Turns that say a genre or a person that is not theirs to say: the genre word "scary" (horror,
# not a catalog genre name), "funny" and "hilarious" (comedy), the unlinked stars Hale Brandt
# and Juno Faraday. None may become a template; the unlinked genre name "horror" may, as a slot.
PLANTED = {"conv_id": "planted", "dialog": [
    _turn("Seeker", "Hi! I am looking for a good movie tonight."),
    _turn("Recommender", "What kind of scary movies do you like?"),
    _turn("Seeker", "I love horror films."),
    _turn("Recommender", "Try Velvet Storm (2011), Hale Brandt is great in it.", movies=["Velvet Storm (2011)"]),
    _turn("Seeker", "Edda Marsh is so funny.", entity=["Edda Marsh"]),
    _turn("Recommender", "You would like Paper Comet (2015), it is hilarious.", movies=["Paper Comet (2015)"]),
    _turn("Recommender", "I think Quiet Vessel (1979) with Juno Faraday is great.", movies=["Quiet Vessel (1979)"]),
    _turn("Seeker", "Thanks, I will watch it. Bye!"),
    _turn("Recommender", "You are welcome, enjoy the movie!"),
]}
FOREIGN = ("scary", "funny", "hilarious", "Hale", "Juno")


@pytest.fixture()
def planted(tmp_path) -> Path:
    folder = write_dataset(tmp_path / "planted")
    (folder / "train_data.json").write_text(json.dumps(TRAIN + [PLANTED]), encoding="utf-8")
    return folder


def _eid(folder: Path, name: str) -> int:
    return json.loads((folder / "entity2id.json").read_text())[name]


# ---------------------------------------------------------------------------- the matcher

def test_matcher_reads_genre_words_by_concept(planted):
    m = NameMatcher(Catalog.from_folder(planted))
    found = m.mentions("what kind of scary movies do you like?")
    assert [(x.text("what kind of scary movies do you like?"), x.concepts) for x in found] == [
        ("scary", frozenset({"horror"}))]
    # a catalog genre's name (and its plural) may become a [genre] slot; a genre word may not
    comedies = m.mentions("I love comedies")[0]
    assert comedies.genre_attr and comedies.attrs and "comedy" in comedies.concepts
    assert not m.mentions("I love scary ones")[0].genre_attr
    # ambiguous genre words count only before a film noun
    assert m.mentions("I watch it with my kids") == []
    assert m.mentions("good kids movies")[0].concepts == frozenset({"family"})
    # a catalog name: capitalized, or lowercase with an uncommon word
    assert m.mentions("a movie with Hale Brandt")[0].attrs
    assert m.mentions("hale brandt is good")[0].attrs
    assert m.mentions("thank you so much") == []


def test_catalog_genres_stand_for_the_concepts_in_their_names():
    from lotcrs_plugin.data.simulator.mentions import _sub_concepts

    assert "horror" in _sub_concepts("supernatural horror")
    assert {"comedy", "drama"} <= _sub_concepts("comedy-drama")
    assert "sci-fi" in _sub_concepts("science fiction on television")
    assert _sub_concepts("police procedural") == set()


# ---------------------------------------------------------------------------- the planted example

def test_planted_foreign_genre_word_and_person_are_not_mined(planted):
    c = Catalog.from_folder(planted)
    templates, report = mine_templates(c, planted)
    texts = [t.text for t in templates]
    for t in texts:
        for word in FOREIGN:
            assert word.lower() not in t.lower(), (word, t)
    # the unlinked catalog genre name became a slot instead of a literal
    assert "I love [genre] films." in texts
    assert not any("horror" in t.lower() for t in texts)
    assert report["attribute_word"] >= 3      # scary, funny, hilarious
    assert report["leftover_name"] >= 2       # Hale Brandt, Juno Faraday (and the fixture's own)


def test_checker_finds_the_planted_contradictions():
    """The check can fail: rendered as they were mined before, the planted turns contradict a
    drama's thread (Golden Orchard: drama, Alma Reyes, Dario Vence) and not a horror's."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dataset(Path(tmp) / "d")
        checker = ThreadChecker(Catalog.from_folder(folder))
        drama = {"conv_id": f"sim-{_eid(folder, 'Golden Orchard (2004)')}-0", "dialog": [
            _turn("Recommender", "What kind of scary movies do you like?"),
            _turn("Seeker", "I love drama films.", entity=["drama"]),
            _turn("Seeker", "Edda Marsh is so funny.", entity=["Edda Marsh"]),
            _turn("Seeker", "I like movies with Hale Brandt."),
            _turn("Recommender", "Try Golden Orchard (2004).", movies=["Golden Orchard (2004)"]),
        ]}
        found = {(f.turn, f.what, f.surface) for f in checker.check(drama)}
        assert found == {(0, "genre", "scary"), (2, "listed_entity", "Edda Marsh"), (2, "genre", "funny"),
                         (3, "name", "Hale Brandt")}
        horror = {"conv_id": f"sim-{_eid(folder, 'Crimson Ledger (2008)')}-0", "dialog": [
            _turn("Recommender", "What kind of scary movies do you like?"),
            _turn("Seeker", "I like movies with Hale Brandt.", entity=["Hale Brandt"]),
        ]}
        assert checker.check(horror) == []
        report = checker.check_all([drama, horror])
        assert report["contradicting_turns"] == 3 and report["contradicting_dialogs"] == 1


def test_simulated_dialogs_with_planted_templates_keep_to_their_threads(planted, tmp_path):
    out = simulate(planted, SimulationConfig(per_item=30, mined_template_share=1.0), out_dir=tmp_path / "s")
    report = ThreadChecker(Catalog.from_folder(planted)).check_folder(out)
    assert report["dialogs"] == 300
    assert report["contradicting_turns"] == 0, report["examples"]
    assert load_stats(out)["mined_template_share"]["turns"] > 0.2


# ---------------------------------------------------------------------------- property test

@pytest.mark.parametrize("seed", [0, 1])
def test_no_simulated_turn_names_an_attribute_outside_its_thread(tmp_path, seed):
    """Synthetic dialogs say mood words of their items' genres ("it was so scary"); mined into
    templates they would land in the threads of other genres. Over a whole simulation of a
    synthetic catalog, every genre, person and title a turn names is its thread's."""
    folder = generate(SyntheticConfig(n_items=60, n_conversations=300, n_genres=12,
                                                          n_people=80, seed=seed), tmp_path / "syn")
    out = simulate(folder, SimulationConfig(per_item=10, mined_template_share=0.8, seed=seed),
                   out_dir=tmp_path / "sim")
    stats = load_stats(out)
    assert stats["mining"]["attribute_word"] > 0     # the training dialogs had such words to drop
    assert stats["mined_template_share"]["turns"] > 0.1
    c = Catalog.from_folder(folder)
    checker = ThreadChecker(c)
    report = checker.check_folder(out)
    assert report["dialogs"] == 600 and report["turns"] == stats["turns"]
    assert report["contradicting_turns"] == 0, report["examples"]
    # the check reads the genres that the turns do name (it is not vacuous)
    named = sum(bool(checker.matcher.mentions(t["raw_text"])) for d in
                json.loads((out / "simulated_data.json").read_text())[:100] for t in d["dialog"])
    assert named > 100


# ---------------------------------------------------------------------------- other templates

def test_builtin_templates_name_nothing_of_these_catalogs(planted, tmp_path):
    syn = generate(SyntheticConfig(n_items=60, n_conversations=60, seed=3), tmp_path / "syn")
    for folder in (planted, syn):
        m = NameMatcher(Catalog.from_folder(folder))
        for t in builtin_templates():
            assert m.in_template(t.text) is None, t.text


def test_a_template_file_that_names_a_genre_is_refused(planted, tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("ask:\n  - Do you like scary movies?\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"'scary'.*slot"):
        simulate(planted, SimulationConfig(per_item=1, templates=str(f)), out_dir=tmp_path / "s")
    f.write_text("prefer:\n  - I adore [genre] movies.\n", encoding="utf-8")
    simulate(planted, SimulationConfig(per_item=1, templates=str(f)), out_dir=tmp_path / "s")


def test_the_cache_key_names_the_simulator_version(planted, monkeypatch):
    """The output changed with this version, so caches of earlier versions are not reused."""
    key = core.input_key(planted, SimulationConfig())
    assert core.SIMULATOR_VERSION >= 2
    monkeypatch.setattr(core, "SIMULATOR_VERSION", core.SIMULATOR_VERSION - 1)
    assert core.input_key(planted, SimulationConfig()) != key
