"""Sampling the synthetic dataset, vectorised: a catalog of named items with attributes, then per
dialog its acts, focus items and slot values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lotcrs_plugin.data.synthetic.config import SyntheticConfig
from lotcrs_plugin.data.synthetic.preferences import telling_pairs
from lotcrs_plugin.data.synthetic.templates import (_ACT_COUNT, _ACT_FOCUS, _ACT_START, ACT_IDS, FOCUS_LAST,
                                                    FOCUS_NEXT, TEMPLATES)
from lotcrs_plugin.data.synthetic.words import ADJECTIVES, FIRST_NAMES, GENRES, LAST_NAMES, NOUNS, PARTS, YEARS


def _zipf_probs(n: int, s: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -s
    return p / p.sum()


def _distinct_draws(rng: np.random.Generator, first: np.ndarray, n_pool: int, k: int) -> np.ndarray:
    """k distinct pool indices per row starting at ``first``: gaps in [1, n_pool // k] so that
    the cumulative offsets stay below n_pool."""
    gaps = rng.integers(1, max(1, n_pool // k) + 1, size=(len(first), k - 1))
    offsets = np.concatenate([np.zeros((len(first), 1), dtype=np.int64), np.cumsum(gaps, axis=1)], 1)
    return (first[:, None] + offsets) % n_pool


def _item_names(rng: np.random.Generator, n: int) -> list[str]:
    # small catalogs use few distinct words (a name space twice the catalog) so that the
    # vocabulary stays small: CRSLab's TextCNN embeds tokens with an n_entity-sized table
    k = math.ceil((2 * n) ** (1 / 3))
    lists = [ADJECTIVES, NOUNS, YEARS]
    sizes = [min(k, len(lst)) for lst in lists]
    if math.prod(sizes) < n:
        sizes = [len(lst) for lst in lists]
    chosen = [[lst[j] for j in sorted(rng.choice(len(lst), size, replace=False))]
              for lst, size in zip(lists, sizes)]
    base = math.prod(sizes)
    parts = math.ceil(n / base)
    idx = rng.choice(base * parts, size=n, replace=False)
    part, rest = np.divmod(idx, base)
    a, b, y = np.unravel_index(rest, sizes)
    adj, noun, year = chosen
    return [f"{adj[i]} {noun[j]}{PARTS[p]} ({year[m]})"
            for i, j, m, p in zip(a.tolist(), b.tolist(), y.tolist(), part.tolist())]


def _people_names(rng: np.random.Generator, n: int) -> list[str]:
    k = math.ceil(math.sqrt(2 * n))
    sizes = [min(k, len(FIRST_NAMES)), min(k, len(LAST_NAMES))]
    if math.prod(sizes) < n:
        sizes = [len(FIRST_NAMES), len(LAST_NAMES)]
    firsts = [FIRST_NAMES[j] for j in sorted(rng.choice(len(FIRST_NAMES), sizes[0], replace=False))]
    lasts = [LAST_NAMES[j] for j in sorted(rng.choice(len(LAST_NAMES), sizes[1], replace=False))]
    base = sizes[0] * sizes[1]
    middles = [""] + [f" {m}" for m in FIRST_NAMES]
    n_mid = math.ceil(n / base)
    idx = rng.choice(base * n_mid, size=n, replace=False)
    mid, rest = np.divmod(idx, base)
    f, last = np.unravel_index(rest, sizes)
    return [f"{firsts[i]}{middles[m]} {lasts[j]}"
            for i, j, m in zip(f.tolist(), last.tolist(), mid.tolist())]


@dataclass
class _Catalog:
    item_names: list[str]
    genre_names: list[str]
    people_names: list[str]
    genres: np.ndarray      # (n_items, 3) genre index, first n_genres_of columns valid
    n_genres_of: np.ndarray
    stars: np.ndarray       # (n_items, 3) person index
    n_stars_of: np.ndarray
    director: np.ndarray    # (n_items,)
    writer: np.ndarray
    popularity: np.ndarray  # (n_items,) mention probability


def _catalog(cfg: SyntheticConfig, rng: np.random.Generator) -> _Catalog:
    n = cfg.n_items
    item_names = _item_names(rng, n)
    people_names = _people_names(rng, cfg.n_people)
    genre_names = list(GENRES)[: cfg.n_genres]
    # a few genres and people are common, most are rare
    genre_p = _zipf_probs(cfg.n_genres, 0.8)
    people_p = _zipf_probs(cfg.n_people, 0.8)[rng.permutation(cfg.n_people)]
    n_genres_of = rng.integers(1, 4, size=n)
    genres = _distinct_draws(rng, rng.choice(cfg.n_genres, size=n, p=genre_p), cfg.n_genres, 3)
    n_stars_of = rng.integers(2, 4, size=n)
    stars = _distinct_draws(rng, rng.choice(cfg.n_people, size=n, p=people_p), cfg.n_people, 3)
    director = rng.choice(cfg.n_people, size=n, p=people_p)
    writer = rng.choice(cfg.n_people, size=n, p=people_p)
    # popularity rank is independent of catalog order
    popularity = _zipf_probs(n, cfg.zipf_exponent)[rng.permutation(n)]
    return _Catalog(item_names, genre_names, people_names, genres, n_genres_of, stars, n_stars_of,
                    director, writer, popularity)


@dataclass
class _Dialogs:
    template: np.ndarray   # (n_conv, T) template index
    item: np.ndarray       # focus item per utterance (mentioned when the template has {item})
    genre: np.ndarray
    person: np.ndarray
    mood: np.ndarray       # 0/1: which of the genre's two moods
    pref: np.ndarray       # (n_conv, T) bool: a stated preference (genre + person) for the next item


def _dialogs(cfg: SyntheticConfig, cat: _Catalog, rng: np.random.Generator) -> _Dialogs:
    """Acts, then focus items, then slot values. As in real CRS dialogs, the seeker's stated
    preferences decide what is recommended: the seeker turn before each recommendation names a genre
    and a person of the item that follows, the pair that fewest catalog items share, while the
    recommended items themselves follow the long-tailed popularity."""
    C, T = cfg.n_conversations, cfg.turns
    pos = np.broadcast_to(np.arange(T), (C, T))
    seeker = pos % 2 == 0
    u = rng.random((C, T))
    a = ACT_IDS
    act = np.where(seeker,
                   np.select([u < 0.4, u < 0.7], [a["s_liked"], a["s_attr"]], a["s_react"]),
                   np.where(u < 0.75, a["r_rec"], a["r_info"]))
    act[:, 0] = a["s_open"]
    act[:, 1] = a["r_ask"]  # the recommender asks for preferences before recommending
    act[:, T - 1] = a["s_bye"] if (T - 1) % 2 == 0 else a["r_bye"]
    # the first informing turn with nothing recommended yet becomes the first recommendation
    rec_or_info = (act == a["r_rec"]) | (act == a["r_info"])
    has = rec_or_info.any(axis=1)
    first = rec_or_info.argmax(axis=1)
    act[has, first[has]] = a["r_rec"]
    # every dialog recommends at least once: the last recommender turn before the goodbye
    last_r = T - 2 if (T - 2) % 2 == 1 else T - 3
    act[~has, last_r] = a["r_rec"]
    is_rec = act == a["r_rec"]
    n_rec_before = np.cumsum(is_rec, axis=1) - is_rec
    # targets and liked items follow the long-tailed popularity
    targets = rng.choice(cfg.n_items, size=(C, T), p=cat.popularity)
    liked = rng.choice(cfg.n_items, size=(C, T), p=cat.popularity)
    next_t = np.take_along_axis(targets, np.minimum(n_rec_before, T - 1), 1)
    # the seeker turn right before a recommendation states the preference that decides it
    pref = np.zeros((C, T), dtype=bool)
    pref[:, :-1] = is_rec[:, 1:]
    pref &= seeker & (pos > 0)
    tell_genre, tell_person, tell_kind = telling_pairs(cat, cfg.n_genres, cfg.n_people, rng)
    which = (rng.random((C, T)) < 0.5).astype(np.int64)  # one of the item's two most telling pairs
    act = np.where(pref, a["s_pref_star"] + tell_kind[next_t, which], act)
    act[(act == a["s_react"]) & (n_rec_before == 0)] = a["s_liked"]
    is_liked = act == a["s_liked"]
    n_liked_before = np.cumsum(is_liked, axis=1) - is_liked

    template = _ACT_START[act] + (rng.random((C, T)) * _ACT_COUNT[act]).astype(np.int64)
    focus_kind = _ACT_FOCUS[act]
    last_t = np.take_along_axis(targets, np.maximum(n_rec_before - 1, 0), 1)
    liked_i = np.take_along_axis(liked, n_liked_before, 1)
    item = np.select([focus_kind == FOCUS_NEXT, focus_kind == FOCUS_LAST], [next_t, last_t], liked_i)

    r_genre, r_star, r_mood = rng.random((3, C, T))
    genre = cat.genres[item, (r_genre * cat.n_genres_of[item]).astype(np.int64)]
    star = cat.stars[item, (r_star * cat.n_stars_of[item]).astype(np.int64)]
    kind = np.array([t.person for t in TEMPLATES])[template]
    person = np.select([kind == 1, kind == 2], [cat.director[item], cat.writer[item]], star)
    genre = np.where(pref, tell_genre[next_t, which], genre)
    person = np.where(pref, tell_person[next_t, which], person)
    mood = (r_mood < 0.5).astype(np.int32)
    # int32 halves what a 1M-dialog dataset holds while its text is written
    return _Dialogs(template.astype(np.int32), item.astype(np.int32), genre.astype(np.int32),
                    person.astype(np.int32), mood, pref)
