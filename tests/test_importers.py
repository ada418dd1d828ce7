"""The importers (raw ReDial, UniCRS format) and `crslab import-data`: every field of the
processed layout on small hand-made fixtures, deterministic carving, each bad-input case, atomic
writing, and (where ../shared/data exists) the real INSPIRED and ReDial files."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from lotcrs_plugin.data.importers import RESERVED_NAMES, import_dataset
from lotcrs_plugin.data.importers import common
from lotcrs_plugin.data.importers.common import PhraseMatcher, tokenize
from lotcrs_plugin.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LOTCRS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

LAYOUT_FILES = {"dataset.json", "train_data.json", "valid_data.json", "test_data.json", "token2id.json",
                "entity2id.json", "word2id.json", "entity_kg.json", "word_kg.json", "item_ids.json",
                "item_stats.json"}


# --------------------------------------------------------------------------- fixtures

MOVIES_CSV = """movieId,movieName,nbMentions
100,The Matrix (1999),12
200,Titanic  (1997),3
300,Heat (1995),1
400,Signs  (2008),2
401,Signs (2008),1
500,war,7
600,War Horse (2011),5
"""

ATTRIBUTES = {
    "100": {"name": "The Matrix", "genre": ["action", "sci-fi"], "director": ["Lana Wachowski"],
            "star": ["Keanu Reeves", "Carrie-Anne Moss"], "writer": ["Lana Wachowski"], "plot": "A hacker."},
    "200": {"genre": ["romance", "drama"], "director": ["James Cameron"], "star": ["Leonardo DiCaprio"],
            "writer": ["James Cameron"], "plot": "A ship."},
    "600": {"genre": ["war", "drama"], "director": ["Steven Spielberg"], "star": [], "writer": [], "plot": ""},
    "999": {"genre": ["comedy"], "plot": "not in the movie list: ignored"},
}


def conversation(conv_id, messages, initiator=1, respondent=2):
    return {
        "movieMentions": {}, "respondentQuestions": {}, "initiatorQuestions": {},
        "conversationId": conv_id, "initiatorWorkerId": initiator, "respondentWorkerId": respondent,
        "messages": [{"timeOffset": 0, "text": text, "senderWorkerId": sender, "messageId": i}
                     for i, (sender, text) in enumerate(messages)],
    }


TRAIN_CONVS = [
    conversation("1", [
        (1, "Hi! I loved @100 , anything with KEANU reeves?"),
        (1, "Maybe some action too."),                       # merged into the turn above
        (2, "You might like @300 or @200 ; James Cameron made it."),
        (1, "I don't like @200 . Titanic is romance"),
        (2, "Then @600 , a good war film by Steven Spielberg."),
    ]),
    conversation("2", [
        (7, "Any good actionable movies like @100 ?"),       # 'actionable' is not 'action'
        (8, "@100 and @400 and @100 again"),
    ], initiator=7, respondent=8),
]
VALID_CONVS = [conversation("3", [(1, "hello"), (2, "Try @401 , Carrie-Anne Moss is in it.")])]
TEST_CONVS = [conversation("4", [(1, "I like drama"), (2, "@200 then")])]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def redial_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "movies.csv").write_text(MOVIES_CSV, encoding="utf-8")
    (src / "attributes.json").write_text(json.dumps(ATTRIBUTES), encoding="utf-8")
    return {
        "train": write_jsonl(src / "train.jsonl", TRAIN_CONVS),
        "valid": write_jsonl(src / "valid.jsonl", VALID_CONVS),
        "test": write_jsonl(src / "test.jsonl", TEST_CONVS),
        "movies": src / "movies.csv",
        "attributes": src / "attributes.json",
    }


def unicrs_turn(text, role, movie_link=(), entity_link=()):
    return {"text": text, "role": role, "movie": [], "movie_name": [], "movie_link": list(movie_link),
            "entity_name": [], "entity_link": list(entity_link)}


R = "<http://dbpedia.org/resource/"
ENTITY2ID = {R + "Movie_A>": 0, R + "Movie_B>": 1, R + "Person_P>": 2, R + "Genre_G>": 3,
             R + "Movie_C>": 4, R + "Not_An_Item_Film>": 5}
UNICRS_TRAIN = [
    [unicrs_turn("Hi there! What do you like?", "RECOMMENDER"),
     unicrs_turn("I like Genre G films with Person P.", "SEEKER", entity_link=[R + "Genre_G>", R + "Person_P>"]),
     unicrs_turn("Have you seen Movie A? Or Movie A's sequel, Not An Item Film?", "RECOMMENDER",
                 movie_link=[R + "Movie_A>", R + "Movie_A>", R + "Not_An_Item_Film>"],
                 entity_link=[R + "Movie_C>", "<http://dbpedia.org/resource/Unknown>"])],
    [unicrs_turn("hello", "SEEKER"), unicrs_turn("Movie C", "RECOMMENDER", movie_link=[R + "Movie_C>"])],
]
UNICRS_VALID = [[unicrs_turn("hey", "SEEKER"), unicrs_turn("Movie B!", "RECOMMENDER", movie_link=[R + "Movie_B>"])]]
UNICRS_TEST = [[unicrs_turn("yo", "SEEKER"), unicrs_turn("Movie A", "RECOMMENDER", movie_link=[R + "Movie_A>"])]]


@pytest.fixture()
def unicrs_files(tmp_path):
    src = tmp_path / "unicrs"
    src.mkdir()
    (src / "entity2id.json").write_text(json.dumps(ENTITY2ID))
    (src / "item_ids.json").write_text(json.dumps([4, 0, 1]))
    (src / "relation2id.json").write_text(json.dumps({
        "<http://dbpedia.org/ontology/starring>": 0, "<http://dbpedia.org/ontology/genre>": 1, "self_loop": 2}))
    (src / "dbpedia_subkg.json").write_text(json.dumps({"0": [[0, 2], [1, 3], [2, 0]], "1": [[1, 3], [2, 1]]}))
    return {
        "train": write_jsonl(src / "train_data_dbpedia.jsonl", UNICRS_TRAIN),
        "valid": write_jsonl(src / "valid_data_dbpedia.jsonl", UNICRS_VALID),
        "test": write_jsonl(src / "test_data_dbpedia.jsonl", UNICRS_TEST),
    }


def load(folder: Path) -> dict:
    return {f.name.removesuffix(".json"): json.loads(f.read_text(encoding="utf-8"))
            for f in folder.iterdir() if f.suffix == ".json"}


def import_redial(files, tmp_path, **kw):
    kw.setdefault("out", tmp_path / "out" / "fixture")
    kw.setdefault("word_min_freq", 1)
    kw.setdefault("attributes", files["attributes"])
    return import_dataset("redial", files["train"], movies=files["movies"], **kw)


# --------------------------------------------------------------------------- tokenizer, matcher

def test_tokenize_is_treebank_style_and_lowercased():
    assert tokenize("I don't like Titanic (1997). It's J.D.'s \u201cbest\u201d sci-fi... Can't wait!") == [
        "i", "do", "n't", "like", "titanic", "(", "1997", ")", ".", "it", "'s", "j.d", ".", "'s", '"',
        "best", '"', "sci-fi", "...", "ca", "n't", "wait", "!"]


def test_phrase_matcher_whole_words_longest_first_case_insensitive():
    m = PhraseMatcher({"Tom": "Tom", "Tom Hanks": "Tom Hanks", "action": "action", "sci-fi": "sci-fi"})
    assert m.find(tokenize("TOM HANKS in an Action sci-fi, actionable; Tom!")) == [
        "Tom Hanks", "action", "sci-fi", "Tom"]
    assert m.find(tokenize("nothing here")) == []


# --------------------------------------------------------------------------- raw ReDial, every field

def test_redial_import_every_field(redial_files, tmp_path):
    result = import_redial(redial_files, tmp_path, valid=redial_files["valid"], test=redial_files["test"])
    out = tmp_path / "out" / "fixture"
    assert result.path == out.resolve() and result.splits == {"train": 2, "valid": 1, "test": 1}
    assert LAYOUT_FILES | {"item_attributes.json"} == {f.name for f in out.iterdir()}
    d = load(out)

    meta = d["dataset"]
    assert meta["format"] == "lotcrs-processed" and meta["format_version"] == 1
    assert meta["name"] == "fixture" and meta["language"] == "en"
    assert meta["splits"] == {"train": 2, "valid": 1, "test": 1}
    assert meta["tail"] == {"definition": "source_mentions <= threshold", "threshold": 4}
    assert meta["source"]["input_format"] == "redial"
    assert meta["source"]["splits"]["valid"]["file"] == str(redial_files["valid"].resolve())

    # catalog: CSV order, white space collapsed, duplicate names suffixed with their id,
    # a genre spelled like a movie gets its kind
    items = ["The Matrix (1999)", "Titanic (1997)", "Heat (1995)", "Signs (2008) [400]",
             "Signs (2008) [401]", "war", "War Horse (2011)"]
    e2i = d["entity2id"]
    assert list(e2i)[:7] == items and d["item_ids"] == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(e2i.values()) == list(range(1, len(e2i) + 1))
    genres = ["action", "drama", "romance", "sci-fi", "war (genre)"]
    people = ["Carrie-Anne Moss", "James Cameron", "Keanu Reeves", "Lana Wachowski", "Leonardo DiCaprio",
              "Steven Spielberg"]
    assert list(e2i)[7:] == genres + people          # "comedy" only belongs to an unknown movie id

    name = {i: n for n, i in e2i.items()}
    kg = {(name[h], r, name[t]) for h, r, t in d["entity_kg"]}
    assert kg == {
        ("The Matrix (1999)", "genre", "action"), ("The Matrix (1999)", "genre", "sci-fi"),
        ("The Matrix (1999)", "director", "Lana Wachowski"), ("The Matrix (1999)", "writer", "Lana Wachowski"),
        ("The Matrix (1999)", "star", "Keanu Reeves"), ("The Matrix (1999)", "star", "Carrie-Anne Moss"),
        ("Titanic (1997)", "genre", "romance"), ("Titanic (1997)", "genre", "drama"),
        ("Titanic (1997)", "director", "James Cameron"), ("Titanic (1997)", "writer", "James Cameron"),
        ("Titanic (1997)", "star", "Leonardo DiCaprio"),
        ("War Horse (2011)", "genre", "war (genre)"), ("War Horse (2011)", "genre", "drama"),
        ("War Horse (2011)", "director", "Steven Spielberg"),
    }
    assert len(d["entity_kg"]) == len(kg) and d["word_kg"] == []
    assert d["item_attributes"]["1"] == {"genre": ["action", "sci-fi"], "director": ["Lana Wachowski"],
                                         "star": ["Keanu Reeves", "Carrie-Anne Moss"],
                                         "writer": ["Lana Wachowski"], "plot": "A hacker."}
    assert set(d["item_attributes"]) == {"1", "2", "7"}

    conv1, conv2 = d["train_data"]
    assert [c["conv_id"] for c in d["train_data"]] == ["1", "2"]
    assert d["valid_data"][0]["conv_id"] == "3" and d["test_data"][0]["conv_id"] == "4"
    t0, t1, t2, t3 = conv1["dialog"]
    assert [t["utt_id"] for t in conv1["dialog"]] == [0, 1, 2, 3]
    assert [t["role"] for t in conv1["dialog"]] == ["Seeker", "Recommender", "Seeker", "Recommender"]
    assert t0["raw_text"] == "Hi! I loved The Matrix (1999) , anything with KEANU reeves? Maybe some action too."
    assert t0["text"] == ["hi", "!", "i", "loved", "the", "matrix", "(", "1999", ")", ",", "anything", "with",
                          "keanu", "reeves", "?", "maybe", "some", "action", "too", "."]
    assert t0["movies"] == ["The Matrix (1999)"]
    assert t0["entity"] == ["Keanu Reeves", "action"]
    assert t1["movies"] == ["Heat (1995)", "Titanic (1997)"] and t1["entity"] == ["James Cameron"]
    assert t2["raw_text"] == "I don't like Titanic (1997) . Titanic is romance"
    assert t2["text"][:4] == ["i", "do", "n't", "like"]
    assert t2["entity"] == ["romance"]
    # the title "War Horse" is masked while linking: only the free-text "war" is a genre
    assert t3["movies"] == ["War Horse (2011)"] and t3["entity"] == ["war (genre)", "Steven Spielberg"]
    c2 = conv2["dialog"]
    assert c2[0]["entity"] == [] and c2[1]["movies"] == ["The Matrix (1999)", "Signs (2008) [400]"]

    # vocabularies: specials first, train tokens only; concept words are train content words
    tok = d["token2id"]
    assert [tok[s] for s in ("__pad__", "__start__", "__end__", "__unk__")] == [0, 1, 2, 3]
    assert sorted(tok.values()) == list(range(len(tok)))
    assert "keanu" in tok and "hello" not in tok          # "hello" is only in valid
    w2i = d["word2id"]
    assert sorted(w2i.values()) == list(range(1, len(w2i) + 1))
    assert "matrix" in w2i and "the" not in w2i and "(" not in w2i and "1999" not in w2i
    assert t2["word"] == ["like", "titanic", "romance"]
    assert d["valid_data"][0]["dialog"][0]["word"] == []   # "hello" is no train word

    # mention counts: train split only, once per turn, Seeker and Recommender turns
    stats = d["item_stats"]
    assert set(stats) == {str(i) for i in d["item_ids"]}
    assert {s["name"]: s["train_mentions"] for s in stats.values()} == {
        "The Matrix (1999)": 3, "Titanic (1997)": 2, "Heat (1995)": 1, "Signs (2008) [400]": 1,
        "Signs (2008) [401]": 0, "war": 0, "War Horse (2011)": 1}
    assert [stats[str(i)]["source_mentions"] for i in d["item_ids"]] == [12, 3, 1, 2, 1, 7, 5]
    # the training samples' count: Recommender turns only
    rec_turns: dict[str, int] = {}
    for conv in d["train_data"]:
        for turn in conv["dialog"]:
            if turn["role"] == "Recommender":
                for m in turn["movies"]:
                    rec_turns[m] = rec_turns.get(m, 0) + 1
    assert {s["name"]: s["train_rec_mentions"] for s in stats.values() if s["train_rec_mentions"]} == rec_turns
    assert 0 < sum(rec_turns.values()) < sum(s["train_mentions"] for s in stats.values())
    for split in ("train", "valid", "test"):
        for conv in d[f"{split}_data"]:
            for turn in conv["dialog"]:
                assert set(turn) == {"utt_id", "role", "text", "raw_text", "movies", "entity", "word"}
                assert all(e2i[m] in d["item_ids"] for m in turn["movies"])
                assert all(e2i[e] not in d["item_ids"] for e in turn["entity"])


def test_redial_without_attributes_and_unmerged(redial_files, tmp_path):
    import_redial(redial_files, tmp_path, valid=redial_files["valid"], test=redial_files["test"],
                  merge_turns=False, attributes=None)
    d = load(tmp_path / "out" / "fixture")
    assert len(d["entity2id"]) == 7 and d["entity_kg"] == [] and "item_attributes" not in d
    first = d["train_data"][0]["dialog"]
    assert [t["role"] for t in first[:3]] == ["Seeker", "Seeker", "Recommender"]
    assert all(t["entity"] == [] for conv in d["train_data"] for t in conv["dialog"])


# --------------------------------------------------------------------------- UniCRS, every field

def test_unicrs_import_every_field(unicrs_files, tmp_path):
    out = tmp_path / "ds"
    result = import_dataset("unicrs", unicrs_files["train"], valid=unicrs_files["valid"],
                            test=unicrs_files["test"], name="tiny_unicrs", out=out, word_min_freq=1,
                            tail_threshold=1)
    assert result.splits == {"train": 2, "valid": 1, "test": 1} and result.n_items == 3
    d = load(out)
    assert LAYOUT_FILES == {f.name for f in out.iterdir()}
    assert d["dataset"]["name"] == "tiny_unicrs"
    assert d["dataset"]["tail"] == {"definition": "train_mentions <= threshold", "threshold": 1}
    assert d["dataset"]["source"]["kg_dir"] == str(unicrs_files["train"].parent.resolve())
    # the file's ids 0..5 become 1..6 in the same order; items in item_ids.json order
    assert d["entity2id"] == {k: v + 1 for k, v in ENTITY2ID.items()}
    assert d["item_ids"] == [5, 1, 2]
    e2i = d["entity2id"]
    name = {i: n for n, i in e2i.items()}
    assert [(name[h], r, name[t]) for h, r, t in d["entity_kg"]] == [
        (R + "Movie_A>", "starring", R + "Person_P>"), (R + "Movie_A>", "genre", R + "Genre_G>"),
        (R + "Movie_B>", "genre", R + "Genre_G>")]                    # self loops dropped
    t0, t1, t2 = d["train_data"][0]["dialog"]
    assert d["train_data"][0]["conv_id"] == "train-1" and d["test_data"][0]["conv_id"] == "test-1"
    assert [t0["role"], t1["role"], t2["role"]] == ["Recommender", "Seeker", "Recommender"]
    assert t0["text"] == ["hi", "there", "!", "what", "do", "you", "like", "?"]
    assert t1["entity"] == [R + "Genre_G>", R + "Person_P>"] and t1["movies"] == []
    # repeated movie once; a linked film outside item_ids is an entity; an item among the entity
    # links is left out; an unknown entity link is dropped
    assert t2["movies"] == [R + "Movie_A>"] and t2["entity"] == [R + "Not_An_Item_Film>"]
    assert t2["raw_text"] == "Have you seen Movie A? Or Movie A's sequel, Not An Item Film?"
    assert t2["word"] == ["seen", "movie", "sequel", "item", "film"]
    stats = d["item_stats"]
    assert stats == {
        "5": {"name": R + "Movie_C>", "train_mentions": 1, "train_rec_mentions": 1, "source_mentions": None},
        "1": {"name": R + "Movie_A>", "train_mentions": 1, "train_rec_mentions": 1, "source_mentions": None},
        "2": {"name": R + "Movie_B>", "train_mentions": 0, "train_rec_mentions": 0, "source_mentions": None},
    }


# --------------------------------------------------------------------------- carving

def many_convs(n):
    return [conversation(str(1000 + i), [(1, f"hi {i} @100"), (2, f"try @{(200, 300)[i % 2]}")]) for i in range(n)]


def test_carving_is_deterministic_by_conversation(redial_files, tmp_path):
    train = write_jsonl(tmp_path / "many.jsonl", many_convs(40))
    files = {**redial_files, "train": train}

    def split_ids(out, seed):
        import_redial(files, tmp_path, out=out, seed=seed, valid_fraction=0.1, test_fraction=0.2)
        d = load(out)
        return {s: [c["conv_id"] for c in d[f"{s}_data"]] for s in ("train", "valid", "test")}, d

    a, d = split_ids(tmp_path / "a", 0)
    b, _ = split_ids(tmp_path / "b", 0)
    c, _ = split_ids(tmp_path / "c", 1)
    assert a == b and a != c
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (28, 4, 8)
    assert sorted(a["train"] + a["valid"] + a["test"]) == sorted(str(1000 + i) for i in range(40))
    assert a["train"] == sorted(a["train"])               # file order kept
    carved = d["dataset"]["source"]["splits"]
    assert carved["valid"]["carved_from"] == "train" and carved["valid"]["seed"] == 0
    assert carved["test"]["fraction"] == 0.2 and carved["train"]["dialogs_in_file"] == 40
    # the choice depends on conversation ids, not on the order of the file
    rev = write_jsonl(tmp_path / "rev.jsonl", many_convs(40)[::-1])
    import_redial({**files, "train": rev}, tmp_path, out=tmp_path / "r", seed=0,
                  valid_fraction=0.1, test_fraction=0.2)
    r = load(tmp_path / "r")
    assert sorted(c["conv_id"] for c in r["test_data"]) == sorted(a["test"])
    # a given test file: only valid is carved
    import_redial(files, tmp_path, out=tmp_path / "t", test=redial_files["test"])
    t = load(tmp_path / "t")
    assert t["dataset"]["splits"] == {"train": 36, "valid": 4, "test": 1}
    assert "file" in t["dataset"]["source"]["splits"]["test"]


# --------------------------------------------------------------------------- bad input

def no_leftovers(parent: Path) -> bool:
    return not parent.exists() or not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_malformed_line_names_file_and_line(redial_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TRAIN_CONVS[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{bad}:3: malformed JSON line"):
        import_redial({**redial_files, "train": bad}, tmp_path)
    assert not (tmp_path / "out" / "fixture").exists() and no_leftovers(tmp_path / "out")


def test_malformed_unicrs_line(unicrs_files, tmp_path):
    bad = unicrs_files["valid"]
    bad.write_text(json.dumps(UNICRS_VALID[0]) + "\n[{\"text\": \n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{bad}:2: malformed JSON line"):
        import_dataset("unicrs", unicrs_files["train"], valid=bad, name="x", out=tmp_path / "x")


def test_unknown_movie_id(redial_files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [TRAIN_CONVS[0], conversation("9", [(1, "seen @123456 ?")])])
    with pytest.raises(UserError, match=rf"{bad}:2: unknown movie id @123456"):
        import_redial({**redial_files, "train": bad}, tmp_path)


def test_unknown_unicrs_movie(unicrs_files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [[unicrs_turn("x", "SEEKER", movie_link=[R + "Nope>"])]])
    with pytest.raises(UserError, match=rf"{bad}:1: turn 0: unknown movie"):
        import_dataset("unicrs", bad, valid=unicrs_files["valid"], test=unicrs_files["test"],
                       kg_dir=unicrs_files["train"].parent, name="x", out=tmp_path / "x")


def test_bad_role(unicrs_files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [[unicrs_turn("x", "USER")]])
    with pytest.raises(UserError, match=rf"{bad}:1: turn 0 has role 'USER'"):
        import_dataset("unicrs", bad, kg_dir=unicrs_files["train"].parent, name="x", out=tmp_path / "x")


def test_missing_files(redial_files, unicrs_files, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=rf"--train: file not found: {missing}"):
        import_redial({**redial_files, "train": missing}, tmp_path)
    with pytest.raises(UserError, match=r"--attributes: file not found"):
        import_redial(redial_files, tmp_path, attributes=tmp_path / "no.json")
    with pytest.raises(UserError, match=r"--format redial needs --movies"):
        import_dataset("redial", redial_files["train"], out=tmp_path / "x")
    (unicrs_files["train"].parent / "relation2id.json").unlink()
    with pytest.raises(UserError, match=r"relation2id.json: file not found"):
        import_dataset("unicrs", unicrs_files["train"], name="x", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_empty_split(redial_files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{empty}: the valid split has no dialogs"):
        import_redial(redial_files, tmp_path, valid=empty)
    one = write_jsonl(tmp_path / "one.jsonl", TRAIN_CONVS[:1])
    with pytest.raises(UserError, match=r"cannot carve 1 valid, 1 test conversations out of 1"):
        import_redial({**redial_files, "train": one}, tmp_path)
    assert no_leftovers(tmp_path / "out")


def test_bad_movie_csv_names_line(redial_files, tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("movieId,movieName,nbMentions\n1,A,2\n1,B,3\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{csv}:3: movieId 1 already appeared on line 2"):
        import_redial({**redial_files, "movies": csv}, tmp_path)


@pytest.mark.parametrize("name", list(RESERVED_NAMES) + ["redial", "INSPIRED", "Synthetic", "../x", ""])
def test_reserved_or_bad_names_refused(redial_files, tmp_path, name):
    with pytest.raises(UserError, match="dataset name"):
        import_dataset("redial", redial_files["train"], movies=redial_files["movies"], name=name)


def test_options_of_the_other_format_refused(redial_files, unicrs_files, tmp_path):
    with pytest.raises(UserError, match="--kg-dir applies to --format unicrs"):
        import_redial(redial_files, tmp_path, kg_dir=tmp_path)
    with pytest.raises(UserError, match="--movies and --attributes apply to --format redial"):
        import_dataset("unicrs", unicrs_files["train"], movies=redial_files["movies"], out=tmp_path / "u")


# --------------------------------------------------------------------------- atomic writing

def test_existing_dataset_needs_force_and_is_replaced(redial_files, tmp_path):
    out = tmp_path / "out" / "fixture"
    import_redial(redial_files, tmp_path, valid=redial_files["valid"], test=redial_files["test"])
    before = (out / "train_data.json").read_bytes()
    with pytest.raises(UserError, match="pass --force"):
        import_redial(redial_files, tmp_path)
    assert (out / "train_data.json").read_bytes() == before
    train = write_jsonl(tmp_path / "many.jsonl", many_convs(20))
    import_redial({**redial_files, "train": train}, tmp_path, force=True)
    assert load(out)["dataset"]["splits"] == {"train": 16, "valid": 2, "test": 2}
    assert no_leftovers(out.parent)


def test_foreign_folder_never_replaced(redial_files, tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not made by the importer"):
        import_redial(redial_files, tmp_path, out=foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_failure_while_writing_leaves_old_dataset_and_no_temp(redial_files, tmp_path, monkeypatch):
    out = tmp_path / "out" / "fixture"
    import_redial(redial_files, tmp_path, valid=redial_files["valid"], test=redial_files["test"])
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_dump = common._dump

    def failing_dump(obj, path):   # a disk that fills up half-way through
        if path.name == "item_ids.json":
            raise OSError(28, "No space left on device")
        real_dump(obj, path)

    monkeypatch.setattr(common, "_dump", failing_dump)
    splits = {"valid": redial_files["valid"], "test": redial_files["test"]}
    with pytest.raises(OSError):
        import_redial(redial_files, tmp_path, force=True, **splits)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    with pytest.raises(OSError):
        import_redial(redial_files, tmp_path, out=tmp_path / "out" / "fresh", **splits)
    assert not (tmp_path / "out" / "fresh").exists()
    assert no_leftovers(out.parent)


def test_default_destination_is_under_the_root(redial_files, lotcrs_home):
    result = import_dataset("redial", redial_files["train"], name="fixture_home", movies=redial_files["movies"],
                            valid=redial_files["valid"], test=redial_files["test"], force=True)
    assert result.path == lotcrs_home / "data" / "dataset" / "fixture_home"
    assert (result.path / "dataset.json").is_file()
    mode = result.path.stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask()     # not mkdtemp's 0700


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# --------------------------------------------------------------------------- CLI

def run_cli(argv):
    from lotcrs_plugin.commands import import_data

    parser = argparse.ArgumentParser()
    import_data.add_arguments(parser)
    return import_data.run(parser.parse_args(argv))


def test_cli_imports_and_prints_counts(unicrs_files, tmp_path, capsys):
    from lotcrs_plugin.commands import import_data

    assert import_data.NAME == "import-data" and import_data.HELP
    rc = run_cli(["--format", "unicrs", "--name", "cli_ds", "--train", str(unicrs_files["train"]),
                  "--test", str(unicrs_files["test"]), "--valid-fraction", "0.5", "--quiet",
                  "--out", str(tmp_path / "cli_ds")])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"into {tmp_path / 'cli_ds'}" in out and "train 1, valid 1, test 1" in out and "items 3" in out
    with pytest.raises(UserError, match="--force"):
        run_cli(["--format", "unicrs", "--name", "cli_ds", "--train", str(unicrs_files["train"]),
                 "--out", str(tmp_path / "cli_ds")])


def test_command_module_imports_only_light_modules():
    import subprocess
    import sys

    code = ("import sys, lotcrs_plugin.commands.import_data; "
            "print(any(m in sys.modules for m in ('torch', 'crslab', 'transformers', 'nltk')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# --------------------------------------------------------------------------- the reader

def test_imported_fixture_loads_through_processed_dataset(redial_files, tmp_path):
    processed = pytest.importorskip("lotcrs_plugin.data.processed")
    from lotcrs_plugin.data.processed_folder import validate_folder

    # CRSLab ranks the top 50 items, so the reader wants a catalog of at least 50
    extra = "".join(f"{700 + i},Filler Movie {i} (2000),0\n" for i in range(50))
    redial_files["movies"].write_text(MOVIES_CSV + extra, encoding="utf-8")
    import_redial(redial_files, tmp_path, valid=redial_files["valid"], test=redial_files["test"])
    folder = tmp_path / "out" / "fixture"
    assert validate_folder(folder)["name"] == "fixture"
    opt = {"dataset": "imported_fixture", "context_truncate": 64, "response_truncate": 20,
           "item_truncate": 10, "entity_truncate": 10, "word_truncate": 10}
    ds = processed.dataset_class_for("imported_fixture", folder)(opt, "nltk")
    d = load(folder)
    e2i, tok = d["entity2id"], d["token2id"]
    # one sample per turn after the first of each dialog (turns already alternate)
    assert len(ds.train_data) == sum(len(c["dialog"]) - 1 for c in d["train_data"]) == 4
    first = d["train_data"][0]["dialog"]
    sample = ds.train_data[0]
    assert sample["context_tokens"] == [[tok[w] for w in first[0]["text"]]]
    assert sample["items"] == [e2i["Heat (1995)"], e2i["Titanic (1997)"]]
    assert sample["context_entities"] == [e2i[e] for e in ["Keanu Reeves", "action", "The Matrix (1999)"]]
    assert ds.side_data["item_entity_ids"] == d["item_ids"] and len(d["item_ids"]) == 57
    assert ds.side_data["item_stats"][e2i["The Matrix (1999)"]]["train_mentions"] == 3
    assert ds.side_data["entity_kg"]["n_relation"] == 5            # 4 relations + the self loop
    assert ds.valid_data[0]["items"] == [e2i["Signs (2008) [401]"]]


# --------------------------------------------------------------------------- the real data

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "inspired").is_dir() or not (SHARED_DATA / "redial").is_dir(),
                                  reason=f"the shared data is not at {SHARED_DATA} (set LOTCRS_SHARED_DATA)")


@needs_shared
def test_real_inspired(tmp_path):
    src = SHARED_DATA / "inspired"
    result = import_dataset("unicrs", src / "train_data_dbpedia.jsonl", valid=src / "valid_data_dbpedia.jsonl",
                            test=src / "test_data_dbpedia.jsonl", name="inspired_unicrs", out=tmp_path / "i")
    assert result.splits == {"train": 801, "valid": 99, "test": 99}
    assert result.n_items == 1123 and result.n_entities == 17320
    items = json.loads((tmp_path / "i" / "item_ids.json").read_text())
    assert len(items) == len(set(items)) == 1123
    from lotcrs_plugin.data.processed_folder import validate_folder

    assert validate_folder(tmp_path / "i")["splits"] == result.splits


@needs_shared
def test_real_redial(tmp_path):
    src = SHARED_DATA / "redial"
    result = import_dataset("redial", src / "train_partial.jsonl", movies=src / "movies_with_mentions.csv",
                            attributes=src / "movie_attributes.json", name="redial_partial", out=tmp_path / "r")
    assert result.n_items == 6924
    assert sum(result.splits.values()) == 1813 and result.splits["valid"] == result.splits["test"] == 181
    stats = json.loads((tmp_path / "r" / "item_stats.json").read_text())
    assert sum(1 for s in stats.values() if s["source_mentions"] <= 4) == 4567
    assert sum(s["train_mentions"] for s in stats.values()) > 0
    from lotcrs_plugin.data.processed_folder import validate_folder

    assert validate_folder(tmp_path / "r")["splits"] == result.splits
