"""The synthetic dataset's stated preferences: which (genre, person) pair of an item a seeker who
wants it names, and how often such a pair belongs to that item alone.

``cat`` is the generator's catalog (lotcrs_plugin.data.synthetic.sampling._Catalog): per item up to 3 genres
(``genres``, ``n_genres_of``), 2-3 stars (``stars``, ``n_stars_of``), a director and a writer. Its
people are read as one (n_items, 5) table: the 3 star columns, then director, then writer.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def item_people(cat: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every person of every item: (n_items, 5) person index, kind (index into PERSON_SLOTS) and
    validity (an item has 2 or 3 stars)."""
    n = len(cat.item_names)
    people = np.concatenate([cat.stars, cat.director[:, None], cat.writer[:, None]], axis=1)
    kind = np.broadcast_to(np.array([0, 0, 0, 1, 2]), people.shape)
    valid = np.concatenate([np.arange(3)[None, :] < cat.n_stars_of[:, None], np.ones((n, 2), bool)], axis=1)
    return people, kind, valid


def pair_codes(cat: Any, n_people: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (genre, person) pair of every item: (n_items, 3, 5) code genre * n_people + person,
    the person's kind and validity."""
    people, kind, p_valid = item_people(cat)
    g_valid = np.arange(3)[None, :] < cat.n_genres_of[:, None]
    codes = cat.genres[:, :, None].astype(np.int64) * n_people + people[:, None, :]
    valid = g_valid[:, :, None] & p_valid[:, None, :]
    return codes, np.broadcast_to(kind[:, None, :], codes.shape), valid


def pair_items(cat: Any, n_genres: int, n_people: int) -> np.ndarray:
    """(n_genres * n_people,) how many catalog items have each (genre, person) pair."""
    codes, _, valid = pair_codes(cat, n_people)
    item = np.broadcast_to(np.arange(len(codes), dtype=np.int64)[:, None, None], codes.shape)
    span = n_genres * n_people
    per_item = np.unique(item[valid] * span + codes[valid])  # an item counts once per pair
    return np.bincount(per_item % span, minlength=span)


def telling_pairs(cat: Any, n_genres: int, n_people: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item the two (genre, person) pairs shared by the fewest catalog items: what a seeker who
    wants the item asks for, as they narrow the catalog most. Genre, person and the person's kind,
    (n_items, 2) each."""
    codes, kind, valid = pair_codes(cat, n_people)
    n = len(codes)
    codes, kind, valid = codes.reshape(n, -1), kind.reshape(n, -1), valid.reshape(n, -1)
    count = pair_items(cat, n_genres, n_people)
    score = np.where(valid, count[codes] + rng.random(codes.shape), np.inf)  # ties broken at random
    best = np.argsort(score, axis=1)[:, :2]
    chosen = np.take_along_axis(codes, best, 1)
    return chosen // n_people, chosen % n_people, np.take_along_axis(kind, best, 1)


def preference_stats(cat: Any, n_genres: int, n_people: int, genre: np.ndarray, person: np.ndarray,
                     pref: np.ndarray, recommends: np.ndarray) -> dict[str, float]:
    """How far the stated preferences decide the recommendation: the share of recommendations
    (``recommends``: (n_conv, T) a recommender turn naming an item) preceded by a preference turn
    (``pref``), and of those preferences whose (genre, person) pair belongs to one catalog item."""
    counts = pair_items(cat, n_genres, n_people)
    stated = genre[pref].astype(np.int64) * n_people + person[pref]
    before = np.zeros_like(recommends)
    before[:, 1:] = pref[:, :-1]
    return {"recommendations_after_a_preference": round(float(before[recommends].mean()), 4),
            "preferences_naming_one_item": round(float((counts[stated] == 1).mean()), 4)}
