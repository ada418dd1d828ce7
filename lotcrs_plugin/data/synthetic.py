"""The built-in ``synthetic`` dataset: a generated catalog and long-tailed conversations.

Nothing is downloaded. A catalog of items with generated names and attributes (genres and
people as director / star / writer) becomes an entity KG; conversations alternate Seeker and
Recommender turns built from small English templates that mention items, genres, people and
mood words; item mentions follow a Zipf-shaped popularity, so a few head items get most
mentions, as in ReDial. As in real CRS data, what the seeker asks for decides what is recommended:
the seeker turn before each recommendation names a genre and a person of the recommended item
(the pair of its attributes that fewest catalog items share, most often that item alone), so a model that
knows the items' attributes can find tail items from the context. The result is written in the processed layout (docs/DATA_LAYOUT.md) to
``<root>/data/dataset/synthetic/<key>/``, where ``key`` hashes the settings, and read back by
:class:`lotcrs_plugin.data.processed.ProcessedDataset`.

Sampling is vectorised numpy; per utterance the only Python work is one ``str.format`` of a
precompiled JSON template, so 100k items x 1M conversations stay feasible. The same settings
give byte-identical files.

Config block (all keys optional)::

    synthetic:
      n_items: 200
      n_conversations: 0        # 0: 3 per item, at least 600 (600 for 200 items)
      turns: 8
      zipf_exponent: 1.0
      n_genres: 12
      n_people: 150
      valid_fraction: 0.1
      test_fraction: 0.1
      seed: 0
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lotcrs_plugin.data.synthetic_preferences import preference_stats, telling_pairs
from lotcrs_plugin.errors import UserError

NAME = "synthetic"
# Bump when the generated content changes for the same settings: it is part of the cache key.
GENERATOR_VERSION = 2  # 2: stated preferences decide the recommended item
FORMAT = "lotcrs-processed"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the synthetic dataset (the config block ``synthetic:``)."""

    n_items: int = 200           # catalog size (CRSLab needs at least 50)
    n_conversations: int = 0     # dialogs over all splits; 0: 3 per item, at least 600
    turns: int = 8               # utterances per dialog, Seeker first, alternating
    zipf_exponent: float = 1.0   # item popularity ~ 1 / rank**s; 0 is uniform
    n_genres: int = 12
    n_people: int = 150          # directors, stars and writers are drawn from one pool
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        # the conversations grow with the catalog unless set: a 100k-item catalog with 600 dialogs
        # would leave nearly every item unmentioned (resolved here, so the cache key names the count)
        if self.n_conversations == 0 and not isinstance(self.n_items, bool) and isinstance(self.n_items, int):
            object.__setattr__(self, "n_conversations", max(600, 3 * self.n_items))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SyntheticConfig":
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise UserError(f"synthetic: expected a mapping of settings, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"synthetic: unknown key(s) {', '.join(map(str, unknown))}; "
                            f"known keys: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, value in d.items():
            want = known[key].type
            if want in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise UserError(f"synthetic.{key}: expected an integer, got {value!r}")
            else:  # float
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(f"synthetic.{key}: expected a number, got {value!r}")
                value = float(value)
            values[key] = value
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Range checks; each names the key and the accepted range."""
        if self.n_items < 50:
            raise UserError(f"synthetic.n_items: {self.n_items} is too small; CRSLab ranks top 50, "
                            "so use at least 50")
        if self.n_items > MAX_ITEMS:
            raise UserError(f"synthetic.n_items: at most {MAX_ITEMS}, got {self.n_items}")
        if self.turns < 4:
            raise UserError(f"synthetic.turns: at least 4 utterances per dialog, got {self.turns}")
        if not 3 <= self.n_genres <= len(GENRES):
            raise UserError(f"synthetic.n_genres: between 3 and {len(GENRES)}, got {self.n_genres}")
        if not 3 <= self.n_people <= MAX_PEOPLE:
            raise UserError(f"synthetic.n_people: between 3 and {MAX_PEOPLE}, got {self.n_people}")
        if self.zipf_exponent < 0 or not math.isfinite(self.zipf_exponent):
            raise UserError(f"synthetic.zipf_exponent: a number >= 0, got {self.zipf_exponent}")
        for key in ("valid_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0 < value < 1:
                raise UserError(f"synthetic.{key}: a fraction between 0 and 1, got {value}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise UserError("synthetic.valid_fraction + synthetic.test_fraction must be below 1")
        if self.seed < 0:
            raise UserError(f"synthetic.seed: a non-negative integer, got {self.seed}")
        n_train, n_valid, n_test = self.split_sizes()
        if min(n_train, n_valid, n_test) < 1:
            raise UserError(f"synthetic.n_conversations: {self.n_conversations} gives an empty split "
                            f"(train {n_train}, valid {n_valid}, test {n_test}); use more conversations")

    def split_sizes(self) -> tuple[int, int, int]:
        n_valid = int(round(self.n_conversations * self.valid_fraction))
        n_test = int(round(self.n_conversations * self.test_fraction))
        return self.n_conversations - n_valid - n_test, n_valid, n_test

    def key(self) -> str:
        """A short hash of the settings and the generator version: the cache folder name."""
        blob = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


# ---- word lists ------------------------------------------------------------------------------

ADJECTIVES = (
    "Silent Broken Golden Hidden Last Lost Dark Bright Endless Frozen Wild Quiet Burning Crimson "
    "Distant Electric Fallen Final Forgotten Gentle Haunted Hollow Iron Lonely Midnight Northern "
    "Painted Restless Sacred Secret Shattered Silver Stolen Strange Sudden Velvet Wandering Wicked "
    "Winter Yellow").split()
NOUNS = (
    "River Kingdom Garden City Road Harbor Mountain Mirror Letter Horizon Island Forest Storm "
    "Shadow Promise Empire Voyage Signal Dream Echo Frontier Machine Ocean Orchard Palace Planet "
    "Prophecy Return Summit Station Stranger Tide Tower Valley Village Whisper Witness Wolf "
    "Legacy Lantern").split()
YEARS = [str(y) for y in range(1960, 2024)]
PARTS = ("", " II", " III", " IV")  # sequels widen the name space for very large catalogs
FIRST_NAMES = (
    "Anna Ben Carla David Elena Frank Grace Henry Iris Jack Karen Leo Maria Nick Olivia Paul "
    "Quinn Rosa Sam Tara Umar Vera Walter Xenia Yusuf Zoe Alice Bruno Chloe Diego Emma Felix "
    "Hana Ivan Julia Kofi Lena Marco Nina Oscar").split()
LAST_NAMES = (
    "Berg Carter Duval Ellis Fischer Garcia Hughes Ito Jensen Keller Lopez Moreau Novak Okafor "
    "Park Quint Rossi Silva Tanaka Ueda Vance Weber Xu Young Zeller Adler Brooks Costa Dunn Evans "
    "Ford Grant Hale Ingram Jones Kim Lund Mills Nash Olsen").split()
MAX_ITEMS = len(ADJECTIVES) * len(NOUNS) * len(YEARS) * len(PARTS)
MAX_PEOPLE = len(FIRST_NAMES) * len(LAST_NAMES) * (len(FIRST_NAMES) + 1)  # optional middle name

# genre -> two mood words (concepts linked to the genre in the word KG); ordered by commonness
GENRES: dict[str, tuple[str, str]] = {
    "comedy": ("funny", "hilarious"),
    "drama": ("moving", "emotional"),
    "action": ("exciting", "intense"),
    "thriller": ("suspenseful", "tense"),
    "romance": ("romantic", "sweet"),
    "horror": ("scary", "creepy"),
    "sci-fi": ("futuristic", "imaginative"),
    "animation": ("colorful", "charming"),
    "crime": ("gritty", "violent"),
    "adventure": ("epic", "thrilling"),
    "fantasy": ("magical", "enchanting"),
    "mystery": ("puzzling", "clever"),
    "family": ("heartwarming", "wholesome"),
    "documentary": ("informative", "insightful"),
    "biography": ("inspiring", "touching"),
    "musical": ("joyful", "catchy"),
    "war": ("harrowing", "brutal"),
    "western": ("rugged", "dusty"),
    "history": ("grand", "detailed"),
    "sport": ("uplifting", "energetic"),
}
# template words that are concepts (ConceptNet-like word nodes), and related pairs among them
GENERAL_CONCEPTS = ("movie", "movies", "film", "films", "story", "classic", "actor", "favorite",
                    "acting", "ending", "director", "watch", "recommend", "enjoy", "love", "fan")
GENERAL_RELATED = (("movie", "film"), ("movies", "films"), ("movie", "movies"), ("film", "films"),
                   ("story", "ending"), ("actor", "acting"), ("director", "film"),
                   ("watch", "movie"), ("love", "enjoy"), ("fan", "love"), ("favorite", "love"),
                   ("recommend", "movie"), ("classic", "film"))

# ---- dialog acts and templates ---------------------------------------------------------------
# Slots: {item}, {genre}, {mood}, {star}, {director}, {writer} (at most one person slot).
# Slot values come from the utterance's focus item: the next target to recommend, the last
# recommended item, or an item the seeker liked.
FOCUS_NEXT, FOCUS_LAST, FOCUS_LIKED = 0, 1, 2
SEEKER, RECOMMENDER = "Seeker", "Recommender"

ACTS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "s_open": (SEEKER, FOCUS_NEXT, (
        "Hi! I am looking for a good {genre} movie.",
        "Hello, can you recommend a {genre} film?",
        "Hey, I would like to watch a {genre} movie tonight.",
        "Hi there, I am in the mood for something {mood}.",
        "Hello! I love {genre} movies. Any ideas?",
        "Hi, I want to see a movie with {star}.",
    )),
    "s_liked": (SEEKER, FOCUS_LIKED, (
        "I really liked {item}.",
        "Recently I watched {item} and loved it.",
        "My favorite movie is {item}.",
        "I enjoyed {item}, it was so {mood}.",
        "Last week I saw {item}, the acting was great.",
        "One of my favorites is {item} with {star}.",
    )),
    "s_attr": (SEEKER, FOCUS_NEXT, (
        "I like movies with {star}.",
        "Anything directed by {director}?",
        "I usually enjoy films written by {writer}.",
        "I prefer {genre} movies, maybe something {mood}.",
        "I am a big fan of {star}.",
        "Something {mood} would be nice.",
    )),
    # the seeker's stated preference right before a recommendation: a genre and the most telling
    # person of the item to come (one act per person kind, so the kind follows the person chosen)
    "s_pref_star": (SEEKER, FOCUS_NEXT, (
        "I like {genre} movies with {star}.",
        "Do you know a {genre} movie with {star}?",
        "Any {genre} film with {star}?",
    )),
    "s_pref_director": (SEEKER, FOCUS_NEXT, (
        "Any {genre} movie directed by {director}?",
        "I love {genre} films directed by {director}.",
    )),
    "s_pref_writer": (SEEKER, FOCUS_NEXT, (
        "I usually enjoy {genre} films written by {writer}.",
        "Any {genre} movie written by {writer}?",
    )),
    "s_react": (SEEKER, FOCUS_LAST, (
        "I have not seen {item}. Is it good?",
        "Oh, I have seen that one already. Anything else?",
        "That sounds great, I love {star}!",
        "Is it {mood}?",
        "Nice, I like {genre} movies.",
        "I will add {item} to my list.",
    )),
    "s_bye": (SEEKER, FOCUS_LAST, (
        "Thanks, I will watch it. Bye!",
        "Great, thank you for the help!",
        "Perfect, have a nice day!",
    )),
    "r_ask": (RECOMMENDER, FOCUS_NEXT, (
        "Sure! What movies have you liked recently?",
        "Do you have a favorite actor?",
        "What kind of movies do you like?",
        "Happy to help. What was the last movie you enjoyed?",
        "Do you prefer something {mood}?",
    )),
    "r_rec": (RECOMMENDER, FOCUS_NEXT, (
        "You might enjoy {item}, it stars {star}.",
        "Have you seen {item}? It is a great {genre} movie.",
        "I would recommend {item}, directed by {director}.",
        "How about {item}? It is very {mood}.",
        "{item} is a classic {genre} film written by {writer}.",
        "Then you should watch {item}.",
    )),
    "r_info": (RECOMMENDER, FOCUS_LAST, (
        "Yes, it is really {mood}, and {star} is great in it.",
        "It is one of the best {genre} movies I know.",
        "The director, {director}, did a wonderful job.",
        "The story is {mood} and the ending is great.",
    )),
    "r_bye": (RECOMMENDER, FOCUS_LAST, (
        "You are welcome, enjoy the movie!",
        "Have fun watching!",
        "Glad I could help. Bye!",
    )),
}
ACT_IDS = {name: i for i, name in enumerate(ACTS)}
PERSON_SLOTS = ("star", "director", "writer")
# _dialogs picks a preference act as s_pref_star + the person's kind (index into PERSON_SLOTS)
if [ACT_IDS[f"s_pref_{k}"] - ACT_IDS["s_pref_star"] for k in PERSON_SLOTS] != [0, 1, 2]:
    raise AssertionError("the s_pref_<kind> acts must follow PERSON_SLOTS' order")

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens, as nltk's word_tokenize splits this controlled English."""
    return _TOKEN_RE.findall(text.lower())


def _tok_fragment(tokens: list[str]) -> str:
    """The inside of a JSON array of the tokens, e.g. '"i", "liked"'."""
    return ", ".join(json.dumps(t) for t in tokens)


def _esc(s: str) -> str:
    """JSON-escaped (no quotes) and str.format-escaped."""
    return json.dumps(s)[1:-1].replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class _Template:
    fmt: str            # a whole utterance JSON object; fields {u} and slot fragments
    has_item: bool
    person: int         # index into PERSON_SLOTS, or -1
    literal_tokens: tuple[str, ...]
    role: str = ""      # Seeker | Recommender


def _compile(raw: str, role: str) -> _Template:
    """Turn a raw template into one str.format string that yields the utterance's JSON."""
    pieces = _SLOT_RE.split(raw)  # literal, slot, literal, slot, ...
    text_parts, raw_parts, entity_parts, word_parts, literal_tokens = [], [], [], [], []
    seen_words: set[str] = set()
    has_item, person = False, -1
    slots_seen: list[str] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                toks = tokenize(piece)
                literal_tokens.extend(toks)
                if toks:
                    text_parts.append(_tok_fragment(toks).replace("{", "{{").replace("}", "}}"))
                raw_parts.append(_esc(piece))
                for t in toks:
                    if t in GENERAL_CONCEPTS and t not in seen_words:
                        seen_words.add(t)
                        word_parts.append(json.dumps(t))
            continue
        slot = piece
        if slot in slots_seen:
            raise AssertionError(f"template repeats slot {slot}: {raw}")
        slots_seen.append(slot)
        if slot == "item":
            has_item = True
            text_parts.append("{it}")
            raw_parts.append("{ir}")
        elif slot == "genre":
            text_parts.append("{gt}")
            raw_parts.append("{gr}")
            entity_parts.append("{gj}")
            word_parts.append("{gw}")
        elif slot == "mood":
            text_parts.append("{mt}")
            raw_parts.append("{mr}")
            word_parts.append("{mw}")
        elif slot in PERSON_SLOTS:
            if person >= 0:
                raise AssertionError(f"template has two person slots: {raw}")
            person = PERSON_SLOTS.index(slot)
            text_parts.append("{pt}")
            raw_parts.append("{pr}")
            entity_parts.append("{pj}")
        else:
            raise AssertionError(f"unknown slot {slot} in {raw}")
    fmt = ('{{"utt_id": {u}, "role": "' + role + '", "text": [' + ", ".join(text_parts)
           + '], "raw_text": "' + "".join(raw_parts) + '", "movies": [' + ("{ij}" if has_item else "")
           + '], "entity": [' + ", ".join(entity_parts) + '], "word": [' + ", ".join(word_parts)
           + "]}}")
    return _Template(fmt, has_item, person, tuple(literal_tokens), role)


def _compile_all() -> tuple[list[_Template], np.ndarray, np.ndarray, np.ndarray]:
    templates: list[_Template] = []
    starts, counts, focus = [], [], []
    for role, foc, raws in ACTS.values():
        starts.append(len(templates))
        counts.append(len(raws))
        focus.append(foc)
        templates.extend(_compile(r, role) for r in raws)
    return templates, np.array(starts), np.array(counts), np.array(focus)


TEMPLATES, _ACT_START, _ACT_COUNT, _ACT_FOCUS = _compile_all()


# ---- generation ------------------------------------------------------------------------------

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
        "source": {"generator": __name__, "generator_version": GENERATOR_VERSION,
                   "key": cfg.key(), "config": asdict(cfg)},
        "splits": {"train": n_train, "valid": n_valid, "test": n_test},
        "tail": {"definition": f"source_mentions <= {threshold}", "threshold": threshold},
        "preferences": preference_stats(cat, cfg.n_genres, cfg.n_people, dia.genre, dia.person, dia.pref,
                                        np.array([t.role == RECOMMENDER and t.has_item for t in TEMPLATES])[dia.template]),
    }
    # written last: its presence marks a complete folder
    _write(dest / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    return dest


def dataset_folder(cfg: SyntheticConfig, dataset_root: str | os.PathLike | None = None) -> Path:
    """Where the dataset for ``cfg`` lives: <dataset root>/synthetic/<key>."""
    if dataset_root is None:
        from lotcrs_plugin.paths import active_layout

        dataset_root = active_layout().dataset
    return Path(dataset_root) / NAME / cfg.key()


def ensure_generated(cfg: SyntheticConfig | None = None,
                     dataset_root: str | os.PathLike | None = None) -> Path:
    """The folder of the dataset for ``cfg``, generated first if absent (written to a temporary
    sibling, then renamed, so that a reader never sees a half-written folder)."""
    cfg = cfg or SyntheticConfig()
    final = dataset_folder(cfg, dataset_root)
    if (final / "dataset.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate(cfg, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            if (final / "dataset.json").is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # an incomplete folder left by hand: replace it
                shutil.rmtree(final)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _dataset_class() -> type:
    """SyntheticDataset is built on first access: it needs crslab (through
    lotcrs_plugin.data.processed), which this module's generator does not."""
    from lotcrs_plugin.data.processed import ProcessedDataset

    class SyntheticDataset(ProcessedDataset):
        """CRSLab dataset ``synthetic``: generated on first use from the config block
        ``synthetic:`` (see :class:`SyntheticConfig`), then read like any processed folder."""

        dataset_name = NAME

        def resolve_folder(self, opt) -> Path:
            return ensure_generated(SyntheticConfig.from_dict(opt.get(NAME, None)))

    SyntheticDataset.__module__ = __name__
    SyntheticDataset.__qualname__ = "SyntheticDataset"
    return SyntheticDataset


def __getattr__(name: str) -> Any:
    if name == "SyntheticDataset":
        cls = _dataset_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
