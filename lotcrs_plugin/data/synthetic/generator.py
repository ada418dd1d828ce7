"""Writing a sampled synthetic dataset in the processed layout (docs/DATA_LAYOUT.md): per utterance
one ``str.format`` of a precompiled template, so that the same settings give byte-identical files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lotcrs_plugin.data.processed_folder import FORMAT, FORMAT_VERSION
from lotcrs_plugin.data.synthetic.config import GENERATOR_VERSION, NAME, SyntheticConfig
from lotcrs_plugin.data.synthetic.preferences import preference_stats
from lotcrs_plugin.data.synthetic.sampling import _catalog, _Catalog, _dialogs, _Dialogs
from lotcrs_plugin.data.synthetic.templates import RECOMMENDER, TEMPLATES, _tok_fragment, tokenize
from lotcrs_plugin.data.synthetic.words import GENERAL_CONCEPTS, GENERAL_RELATED, GENRES

_CHUNK = 20_000  # dialogs formatted at a time


def _format_dialogs(dia: _Dialogs, start: int, stop: int, T: int, fragments: tuple) -> list[str]:
    """The JSON text of dialogs start..stop-1: one str.format per utterance, nothing per token."""
    it_t, it_r, it_j, g_t, g_r, g_j, p_t, p_r, p_j, m_t, m_r, m_j = fragments
    fmts = [t.fmt for t in TEMPLATES]
    rows = slice(start, stop)
    tpl = dia.template[rows].ravel().tolist()
    item = dia.item[rows].ravel().tolist()
    genre = dia.genre[rows].ravel().tolist()
    person = dia.person[rows].ravel().tolist()
    mood = (dia.genre[rows] * 2 + dia.mood[rows]).ravel().tolist()
    uid = list(range(T)) * (stop - start)
    utts = [fmts[t].format(u=u, it=it_t[i], ir=it_r[i], ij=it_j[i], gt=g_t[g], gr=g_r[g], gj=g_j[g],
                           gw=g_j[g], pt=p_t[p], pr=p_r[p], pj=p_j[p], mt=m_t[m], mr=m_r[m], mw=m_j[m])
            for t, u, i, g, p, m in zip(tpl, uid, item, genre, person, mood)]
    return ['{"conv_id": "synthetic-%d", "dialog": [%s]}' % (start + c, ", ".join(utts[c * T:(c + 1) * T]))
            for c in range(stop - start)]


def _entity_kg(cat: _Catalog, genre_eid0: int, people_eid0: int) -> list[list]:
    """[item id, relation, attribute entity id] for every attribute, item-major."""
    n = len(cat.item_names)
    parts = []  # (relation index, item rows, attribute entity ids)
    for col in range(3):
        ok = col < cat.n_genres_of
        parts.append((0, np.flatnonzero(ok), genre_eid0 + cat.genres[ok, col]))
        ok = col < cat.n_stars_of
        parts.append((2, np.flatnonzero(ok), people_eid0 + cat.stars[ok, col]))
    parts.append((1, np.arange(n), people_eid0 + cat.director))
    parts.append((3, np.arange(n), people_eid0 + cat.writer))
    h = np.concatenate([rows for _, rows, _ in parts]) + 1
    r = np.concatenate([np.full(len(rows), rel) for rel, rows, _ in parts])
    t = np.concatenate([tails for _, _, tails in parts])
    order = np.lexsort((t, r, h))
    names = ("genre", "director", "star", "writer")
    return [[a, names[b], c] for a, b, c in zip(h[order].tolist(), r[order].tolist(), t[order].tolist())]


def _json_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def generate(cfg: SyntheticConfig, dest: str | os.PathLike) -> Path:
    """Write the dataset for ``cfg`` into the folder ``dest`` (created; must not exist)."""
    cfg.check()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(cfg.seed)
    cat = _catalog(cfg, rng)
    dia = _dialogs(cfg, cat, rng)
    n_items, n_genres = cfg.n_items, cfg.n_genres

    # entity ids: items 1..n_items (catalog order), then genres, then people
    genre_eid0 = n_items + 1
    people_eid0 = genre_eid0 + n_genres
    entity_names = cat.item_names + cat.genre_names + cat.people_names
    entity2id = {name: i + 1 for i, name in enumerate(entity_names)}
    if len(entity2id) != len(entity_names):
        raise AssertionError("generated entity names collide")

    moods = [GENRES[g] for g in cat.genre_names]
    concepts = sorted(set(cat.genre_names) | {m for pair in moods for m in pair} | set(GENERAL_CONCEPTS))
    word2id = {w: i + 1 for i, w in enumerate(concepts)}

    # precomputed fragments per entity / concept
    def frags(names: list[str]) -> tuple[list[str], list[str], list[str]]:
        tok = [_tok_fragment(tokenize(x)) for x in names]
        raw = [json.dumps(x)[1:-1] for x in names]
        js = [json.dumps(x) for x in names]
        return tok, raw, js

    it_t, it_r, it_j = frags(cat.item_names)
    g_t, g_r, g_j = frags(cat.genre_names)
    p_t, p_r, p_j = frags(cat.people_names)
    mood_names = [m for pair in moods for m in pair]  # index genre * 2 + mood
    m_t, m_r, m_j = frags(mood_names)

    C, T = cfg.n_conversations, cfg.turns
    n_train, n_valid, n_test = cfg.split_sizes()
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
              "test": (n_train + n_valid, C)}
    fragments = (it_t, it_r, it_j, g_t, g_r, g_j, p_t, p_r, p_j, m_t, m_r, m_j)
    for split, (lo, hi) in bounds.items():
        with open(dest / f"{split}_data.json", "w", encoding="utf-8", newline="\n") as f:
            f.write("[\n")
            # chunks bound the memory of the formatted strings for very large datasets
            for start in range(lo, hi, _CHUNK):
                stop = min(hi, start + _CHUNK)
                if start > lo:
                    f.write(",\n")
                f.write(",\n".join(_format_dialogs(dia, start, stop, T, fragments)))
            f.write("\n]\n")

    # mentions: every utterance whose template names an item
    mentioned = np.array([t.has_item for t in TEMPLATES])[dia.template]
    train_counts = np.bincount(dia.item[:n_train][mentioned[:n_train]], minlength=n_items)
    all_counts = np.bincount(dia.item[mentioned], minlength=n_items)
    # recommender turns naming an item: the fine-tuning samples' targets
    recommends = mentioned & np.array([t.role == RECOMMENDER for t in TEMPLATES])[dia.template]
    train_rec_counts = np.bincount(dia.item[:n_train][recommends[:n_train]], minlength=n_items)
    # tail: the least-mentioned two thirds of the catalog (ReDial: 66% of items, nbMentions <= 4)
    threshold = int(np.quantile(all_counts, 2 / 3))

    # vocabulary: every token any utterance can contain
    tokens: set[str] = set()
    for t in TEMPLATES:
        tokens.update(t.literal_tokens)
    for names in (cat.item_names, cat.genre_names, cat.people_names, mood_names):
        for x in names:
            tokens.update(tokenize(x))
    specials = ["__pad__", "__start__", "__end__", "__unk__"]
    token2id = {w: i for i, w in enumerate(specials + sorted(tokens - set(specials)))}

    entity_kg = _entity_kg(cat, genre_eid0, people_eid0)

    word_pairs = [(g, m) for g, pair in zip(cat.genre_names, moods) for m in pair]
    word_pairs += [(g, "movie") for g in cat.genre_names] + list(GENERAL_RELATED)
    word_kg = [[word2id[x], word2id[y]] for x, y in word_pairs]

    item_ids = list(range(1, n_items + 1))
    item_stats = {str(i + 1): {"name": cat.item_names[i], "train_mentions": int(train_counts[i]),
                               "train_rec_mentions": int(train_rec_counts[i]),
                               "source_mentions": int(all_counts[i])} for i in range(n_items)}
    attrs = {}
    for i in range(n_items):
        g = [cat.genre_names[x] for x in cat.genres[i, : cat.n_genres_of[i]].tolist()]
        s = [cat.people_names[x] for x in cat.stars[i, : cat.n_stars_of[i]].tolist()]
        attrs[str(i + 1)] = {
            "genre": g, "director": [cat.people_names[int(cat.director[i])]], "star": s,
            "writer": [cat.people_names[int(cat.writer[i])]],
            "plot": f"A {GENRES[g[0]][i % 2]} {g[0]} story starring {s[0]}.",
        }

    _write(dest / "token2id.json", _json_line(token2id) + "\n")
    _write(dest / "entity2id.json", _json_line(entity2id) + "\n")
    _write(dest / "word2id.json", _json_line(word2id) + "\n")
    _write(dest / "entity_kg.json", _json_line(entity_kg) + "\n")
    _write(dest / "word_kg.json", _json_line(word_kg) + "\n")
    _write(dest / "item_ids.json", _json_line(item_ids) + "\n")
    _write(dest / "item_stats.json", _json_line(item_stats) + "\n")
    _write(dest / "item_attributes.json", _json_line(attrs) + "\n")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": NAME,
        "language": "en",
        # the package a user imports, whichever of its modules writes the files
        "source": {"generator": __package__, "generator_version": GENERATOR_VERSION,
                   "key": cfg.key(), "config": asdict(cfg)},
        "splits": {"train": n_train, "valid": n_valid, "test": n_test},
        "tail": {"definition": f"source_mentions <= {threshold}", "threshold": threshold},
        "preferences": preference_stats(cat, cfg.n_genres, cfg.n_people, dia.genre, dia.person, dia.pref,
                                        np.array([t.role == RECOMMENDER and t.has_item for t in TEMPLATES])[dia.template]),
    }
    # written last: its presence marks a complete folder
    _write(dest / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    return dest
