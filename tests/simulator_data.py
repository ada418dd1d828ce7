"""The simulator tests' small dataset (a catalog of ten items with their attributes and two
training dialogs, written as a processed dataset folder), shared by test_simulator.py and
test_simulator_threads.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

ITEMS = {  # name -> attributes
    "Midnight Harbor (1999)": {"genre": ["thriller", "drama"], "star": ["Alma Reyes", "Boris Quill"], "director": ["Cora Lind"]},
    "Golden Orchard (2004)": {"genre": ["drama"], "star": ["Alma Reyes"], "director": ["Dario Vence"]},
    "Velvet Storm (2011)": {"genre": ["comedy"], "star": ["Boris Quill", "Edda Marsh"], "director": ["Cora Lind"]},
    "Iron Lantern (1987)": {"genre": ["thriller"], "star": ["Fenn Oakes"], "director": ["Dario Vence"]},
    "Paper Comet (2015)": {"genre": ["comedy", "drama"], "star": ["Edda Marsh"], "director": ["Gale Pryor"]},
    "Northern Quarry (1993)": {"genre": ["horror"], "star": ["Fenn Oakes", "Hale Brandt"], "director": ["Gale Pryor"]},
    "Crimson Ledger (2008)": {"genre": ["horror", "thriller"], "star": ["Hale Brandt"], "director": ["Ivo Tarrant"]},
    "Hollow Meridian (2001)": {"genre": ["drama"], "star": ["Juno Faraday"], "director": ["Ivo Tarrant"]},
    "Lonely Satellite (2019)": {},   # no attributes at all
    "Quiet Vessel (1979)": {"genre": ["comedy"], "star": ["Juno Faraday"], "director": ["Kasper Wynn"]},
}
NAMES = list(ITEMS)


def turn(role: str, text: str, movies=(), entity=()) -> dict:
    return {"utt_id": 0, "role": role, "text": text.lower().split(), "raw_text": text,
            "movies": list(movies), "entity": list(entity), "word": []}


TRAIN = [
    {"conv_id": "1", "dialog": [
        turn("Seeker", "Hi! I am looking for a good movie tonight."),
        turn("Recommender", "Sure, what kind of movies do you like?"),
        turn("Seeker", "I really enjoy thriller movies.", entity=["thriller"]),
        turn("Recommender", "Have you seen Midnight Harbor (1999)? It is great.", movies=["Midnight Harbor (1999)"]),
        turn("Seeker", "I loved Golden Orchard so much.", movies=["Golden Orchard (2004)"]),
        turn("Recommender", "Then try Velvet Storm, Alma Reyes is great in it.",
              movies=["Velvet Storm (2011)"], entity=["Alma Reyes"]),
        # an unlinked star: this turn must not become a template
        turn("Seeker", "I like movies with Boris Quill a lot."),
        turn("Recommender", "What genre do you prefer?"),
        turn("Seeker", "Thanks a lot, I will check it out! Bye"),
        turn("Recommender", "You are welcome, enjoy the movie! Bye"),
    ]},
    {"conv_id": "2", "dialog": [
        turn("Seeker", "Hello, can you suggest something to watch?"),
        turn("Recommender", "Of course! What movies did you enjoy lately?"),
        turn("Seeker", "I liked Paper Comet (2015) a lot.", movies=["Paper Comet (2015)"]),
        turn("Seeker", "I am a big fan of Cora Lind films.", entity=["Cora Lind"]),
        # an unlinked title of the catalog: dropped too
        turn("Recommender", "You should watch Iron Lantern and Crimson Ledger.", movies=["Iron Lantern (1987)"]),
        turn("Recommender", "I would recommend Hollow Meridian (2001), a lovely drama.",
              movies=["Hollow Meridian (2001)"], entity=["drama"]),
        turn("Seeker", "Great, thanks for the help!"),
        turn("Recommender", "Have a good night!"),
    ]},
]


def write_dataset(folder: Path, with_train: bool = True, attributes_file: bool = False) -> Path:
    folder.mkdir(parents=True)
    values: list[tuple[str, str]] = []   # (relation, value)
    for attrs in ITEMS.values():
        for rel, vs in attrs.items():
            values += [(rel, v) for v in vs]
    value_names = list(dict.fromkeys(v for _, v in values))
    entities = NAMES + value_names
    entity2id = {e: i for i, e in enumerate(entities, 1)}
    kg = []
    attr_json = {}
    for name, attrs in ITEMS.items():
        attr_json[str(entity2id[name])] = {**attrs, "plot": "A story."}
        for rel, vs in attrs.items():
            kg += [[entity2id[name], rel, entity2id[v]] for v in vs]
    mentions = Counter(m for d in TRAIN for t in d["dialog"] for m in t["movies"])
    stats = {str(entity2id[n]): {"name": n, "train_mentions": mentions.get(n, 0), "source_mentions": None}
             for n in NAMES}
    tokens = sorted({w for d in TRAIN for t in d["dialog"] for w in t["text"]})
    files = {
        "dataset.json": {"format": "lotcrs-processed", "format_version": 1, "name": folder.name},
        "entity2id.json": entity2id,
        "item_ids.json": [entity2id[n] for n in NAMES],
        "item_stats.json": stats,
        "entity_kg.json": [] if attributes_file else kg,
        "word2id.json": {w: i for i, w in enumerate(["movie", "movies", "great", "drama", "thriller"], 1)},
        "token2id.json": {w: i for i, w in enumerate(["__pad__", "__start__", "__end__", "__unk__"] + tokens)},
    }
    if attributes_file:
        files["item_attributes.json"] = attr_json
    if with_train:
        files["train_data.json"] = TRAIN
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj), encoding="utf-8")
    return folder
