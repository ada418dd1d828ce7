"""What every importer shares: reading input files with file:line errors, tokenizing, linking
phrases, carving splits, building vocabularies, and writing the processed layout atomically.

A format module (redial.py, unicrs.py) turns its files into a :class:`Catalog` (entities, items,
KG) and :class:`RawDialog` lists; :func:`write_dataset` turns those into the files of
docs/DATA_LAYOUT.md. Only the standard library is used: an import runs without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lotcrs_plugin.errors import UserError

FORMAT_NAME = "lotcrs-processed"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
ROLES = ("Seeker", "Recommender")
SPECIAL_TOKENS = ("__pad__", "__start__", "__end__", "__unk__")

# CRSLab's own datasets and the plugin's generator: an imported dataset must not shadow them.
RESERVED_NAMES = ("ReDial", "TGReDial", "GoRecDial", "OpenDialKG", "Inspired", "DuRecDial", "synthetic")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def no_progress(message: str) -> None:
    pass


# --------------------------------------------------------------------------- tokenizing

# A regex in the manner of nltk's Treebank tokenizer (clitics and "n't" split off, punctuation
# separate, hyphenated words and decimals kept whole); it needs no downloaded model and is
# ~10x faster than nltk's, which also leaves a sentence-internal period on its word.
_TOKEN_RE = re.compile(
    r"""
      \w+(?=n't\b)              # "do" of "don't", "ca" of "can't" (as Treebank splits them)
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b     # clitics: 's 're 've 'll 'd 'm
    | \w+(?:[-.]\w+)*           # words, hyphenated words, decimals, abbreviations (j.d)
    | \.{2,}                    # ellipsis
    | [^\w\s]                   # any other symbol on its own
    """,
    re.VERBOSE,
)
_QUOTE_FIX = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens of ``text``."""
    return _TOKEN_RE.findall(text.translate(_QUOTE_FIX).lower())


# nltk's English stopword list (nltk_data/corpora/stopwords/english), inlined so that nothing
# has to be downloaded; concept words are content words, so these are left out.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be been
being have has had having do does did doing a an the and but if or because as until while of at
by for with about against between into through during before after above below to from up down
in out on off over under again further then once here there when where why how all any both
each few more most other some such no nor not only own same so than too very s t can will just
don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't
needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
n't 's 're 've 'll 'd 'm ca wo
""".split())
_CONCEPT_RE = re.compile(r"^[a-z][a-z-]*[a-z]$")


class PhraseMatcher:
    """Finds known phrases in token lists: greedy, longest first, non-overlapping, whole tokens.

    Phrases are indexed by their first token and their lengths, so a text is scanned once and
    only tokens that start some phrase cost a lookup (Aho-Corasick-like: O(n_tokens), not
    O(n_tokens * n_phrases)). Matching is on lowercased tokens, hence case-insensitive.
    """

    def __init__(self, phrases: dict[str, str]) -> None:
        """``phrases``: surface text -> the name reported for it (first one wins on a clash)."""
        self._names: dict[tuple[str, ...], str] = {}
        lengths: dict[str, set[int]] = {}
        for surface, name in phrases.items():
            key = tuple(tokenize(surface))
            if not key or key in self._names:
                continue
            self._names[key] = name
            lengths.setdefault(key[0], set()).add(len(key))
        # longest first, so "tom hanks" wins over a phrase "tom"
        self._lengths = {tok: sorted(ls, reverse=True) for tok, ls in lengths.items()}

    def __len__(self) -> int:
        return len(self._names)

    def find(self, tokens: list[str]) -> list[str]:
        """Names of the phrases in ``tokens``, in order of appearance, each once."""
        found: dict[str, None] = {}
        i, n = 0, len(tokens)
        lengths, names = self._lengths, self._names
        while i < n:
            step = 1
            for length in lengths.get(tokens[i], ()):
                if i + length <= n:
                    name = names.get(tuple(tokens[i:i + length]))
                    if name is not None:
                        found[name] = None
                        step = length
                        break
            i += step
        return list(found)


# --------------------------------------------------------------------------- reading inputs

def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: file not found: {p} (give an existing file)")
    return p


def read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON in the {what} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the {what} is not UTF-8 text ({e.reason})") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; a bad line is a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column "
                                    f"{e.colno}); each line must be one JSON value") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None


# --------------------------------------------------------------------------- catalog and dialogs

@dataclass
class RawTurn:
    role: str                    # "Seeker" | "Recommender"
    raw_text: str
    movies: list[str]            # item entity names
    entity: list[str]            # non-item entity names


@dataclass
class RawDialog:
    conv_id: str
    turns: list[RawTurn]
    where: str                   # "file:line", for messages


@dataclass
class Catalog:
    """Entities in id order (ids 1..n), the catalog items among them, and the KG."""

    entities: list[str]
    item_names: list[str]        # catalog order
    kg: list[tuple[str, str, str]] = field(default_factory=list)   # (head, relation, tail) names
    source_mentions: dict[str, int] | None = None                  # item name -> count
    attributes: dict[str, dict] = field(default_factory=dict)       # item name -> attributes

    def check(self) -> None:
        if len(set(self.entities)) != len(self.entities):
            dup = next(n for n, c in Counter(self.entities).items() if c > 1)
            raise UserError(f"entity name {dup!r} occurs twice; entity names must be unique")
        if not self.item_names:
            raise UserError("the catalog has no items; give a movie list with at least one movie")


@dataclass
class SplitSource:
    """How one split was obtained, for dataset.json."""

    dialogs: list[RawDialog]
    origin: dict[str, Any]


def carve_split(dialogs: list[RawDialog], fractions: dict[str, float], seed: int,
                where: str) -> dict[str, list[RawDialog]]:
    """Move whole conversations out of ``dialogs`` into the named splits, deterministically.

    Each conversation's rank is the SHA-256 of ``seed:conv_id``, so the choice depends on the
    seed and the conversation ids only (not on the file order or the Python version). Each carved
    split takes round(fraction * n) conversations, at least one; the rest stay in order.
    """
    n = len(dialogs)
    counts = {}
    for split, frac in fractions.items():
        if not 0.0 < frac < 1.0:
            raise UserError(f"--{split}-fraction must be between 0 and 1 (exclusive), got {frac}")
        counts[split] = max(1, round(frac * n))
    if sum(counts.values()) >= n:
        raise UserError(
            f"{where}: cannot carve {', '.join(f'{counts[s]} {s}' for s in counts)} conversations "
            f"out of {n} and keep any for train; give a larger file or smaller fractions")
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(
        f"{seed}:{dialogs[i].conv_id}".encode()).hexdigest())
    taken: dict[str, list[int]] = {}
    start = 0
    for split in fractions:
        taken[split] = sorted(ranked[start:start + counts[split]])
        start += counts[split]
    moved = {i for idx in taken.values() for i in idx}
    out = {split: [dialogs[i] for i in idx] for split, idx in taken.items()}
    out["train"] = [d for i, d in enumerate(dialogs) if i not in moved]
    return out


def check_unique_conv_ids(splits: dict[str, list[RawDialog]]) -> None:
    seen: dict[str, str] = {}
    for dialogs in splits.values():
        for d in dialogs:
            if d.conv_id in seen:
                raise UserError(f"{d.where}: conversation id {d.conv_id} already appeared at "
                                f"{seen[d.conv_id]}; conversation ids must be unique")
            seen[d.conv_id] = d.where


# --------------------------------------------------------------------------- names and folders

def check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise UserError(f"dataset name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
                        f"(starting with a letter or digit)")
    for reserved in RESERVED_NAMES:
        if name.lower() == reserved.lower():
            raise UserError(f"dataset name {name!r} collides with the built-in dataset {reserved!r}; "
                            f"choose another name (reserved: {', '.join(RESERVED_NAMES)})")


def check_destination(dest: Path, force: bool) -> None:
    """Refuse early what the final rename would refuse, before any work is done."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder; choose another --out")
    if dest.is_dir() and any(dest.iterdir()):
        if not (dest / "dataset.json").is_file():
            raise UserError(f"{dest} is a non-empty folder not made by the importer (no dataset.json); "
                            f"refusing to replace it even with --force; choose another --out")
        if not force:
            raise UserError(f"{dest} already holds an imported dataset; pass --force to replace it")


# --------------------------------------------------------------------------- writing

@dataclass
class ImportResult:
    path: Path
    name: str
    splits: dict[str, int]
    n_items: int
    n_entities: int
    n_kg_edges: int
    n_tokens: int
    n_words: int
    n_turns: int

    def summary(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.splits.items())
        return (f"imported {self.name} into {self.path}: dialogs {splits}; turns {self.n_turns}; "
                f"items {self.n_items}; entities {self.n_entities}; KG edges {self.n_kg_edges}; "
                f"tokens {self.n_tokens}; concept words {self.n_words}")


def _dump(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))


def _ranked(counter: Counter) -> list[str]:
    """Most frequent first, ties alphabetical: a deterministic vocabulary order."""
    return [w for w, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def write_dataset(
    *,
    name: str,
    dest: Path,
    force: bool,
    catalog: Catalog,
    splits: dict[str, SplitSource],
    source: dict[str, Any],
    tail: dict[str, Any],
    word_min_freq: int,
    progress: Progress,
) -> ImportResult:
    """Tokenize, build vocabularies, and write the layout to a temporary sibling of ``dest``,
    then move it into place (the old folder, with ``force``, is moved aside first and deleted
    last, so that a failure at any point leaves either the old or the new dataset complete)."""
    catalog.check()
    for split in SPLITS:
        if not splits[split].dialogs:
            raise UserError(f"{splits[split].origin.get('file', split)}: the {split} split has no "
                            f"dialogs; give a file with at least one conversation")
    check_unique_conv_ids({s: splits[s].dialogs for s in SPLITS})
    entity2id = {e: i for i, e in enumerate(catalog.entities, 1)}
    item_set = set(catalog.item_names)

    # tokens of every turn, once
    progress("tokenizing")
    tokens: dict[str, list[list[list[str]]]] = {
        s: [[tokenize(t.raw_text) for t in d.turns] for d in splits[s].dialogs] for s in SPLITS
    }
    token_counts: Counter = Counter()
    for dialog in tokens["train"]:
        for turn in dialog:
            token_counts.update(turn)
    token2id = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for t in _ranked(token_counts):
        token2id.setdefault(t, len(token2id))
    concept_counts = Counter({w: c for w, c in token_counts.items()
                              if c >= word_min_freq and w not in STOPWORDS and _CONCEPT_RE.match(w)})
    word2id = {w: i for i, w in enumerate(_ranked(concept_counts), 1)}

    train_mentions: Counter = Counter()
    # a recommender turn's movies are the fine-tuning samples' targets: the popularity that the
    # samples (and INSPIRED's published tail, mentioned at most once in them) count
    train_rec_mentions: Counter = Counter()
    out_splits: dict[str, list[dict]] = {}
    n_turns = 0
    for s in SPLITS:
        dialogs_out = []
        for dialog, dialog_tokens in zip(splits[s].dialogs, tokens[s]):
            turns_out = []
            for utt_id, (turn, toks) in enumerate(zip(dialog.turns, dialog_tokens)):
                for m in turn.movies:
                    if m not in item_set:   # a format module's bug, not the user's
                        raise AssertionError(f"{dialog.where}: {m!r} is not a catalog item")
                if s == "train":
                    train_mentions.update(turn.movies)
                    if turn.role == "Recommender":
                        train_rec_mentions.update(turn.movies)  # a turn names a movie once
                turns_out.append({
                    "utt_id": utt_id,
                    "role": turn.role,
                    "text": toks,
                    "raw_text": turn.raw_text,
                    "movies": turn.movies,
                    "entity": turn.entity,
                    "word": list(dict.fromkeys(t for t in toks if t in word2id)),
                })
            n_turns += len(turns_out)
            dialogs_out.append({"conv_id": dialog.conv_id, "dialog": turns_out})
        out_splits[s] = dialogs_out

    item_ids = [entity2id[n] for n in catalog.item_names]
    if len(item_ids) < 50:
        progress(f"note: {len(item_ids)} items; CRSLab's recommenders rank the top 50, so its "
                 f"models need a catalog of at least 50")
    item_stats = {
        str(entity2id[n]): {
            "name": n,
            "train_mentions": train_mentions.get(n, 0),
            "train_rec_mentions": train_rec_mentions.get(n, 0),
            "source_mentions": None if catalog.source_mentions is None else catalog.source_mentions.get(n, 0),
        }
        for n in catalog.item_names
    }
    entity_kg = [[entity2id[h], r, entity2id[t]] for h, r, t in catalog.kg]
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "language": "en",
        "source": source,
        "splits": {s: len(out_splits[s]) for s in SPLITS},
        "tail": tail,
    }

    progress(f"writing {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "importing")
    tmp.mkdir()   # not mkdtemp: its 0700 mode would stick to the dataset folder
    try:
        for s in SPLITS:
            _dump(out_splits[s], tmp / f"{s}_data.json")
        _dump(token2id, tmp / "token2id.json")
        _dump(entity2id, tmp / "entity2id.json")
        _dump(word2id, tmp / "word2id.json")
        _dump(entity_kg, tmp / "entity_kg.json")
        _dump([], tmp / "word_kg.json")
        _dump(item_ids, tmp / "item_ids.json")
        _dump(item_stats, tmp / "item_stats.json")
        if catalog.attributes:
            _dump({str(entity2id[n]): a for n, a in catalog.attributes.items()}, tmp / "item_attributes.json")
        # dataset.json marks a complete folder, so it is written last
        with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)
        _move_into_place(tmp, dest, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(
        path=dest, name=name, splits=meta["splits"], n_items=len(item_ids),
        n_entities=len(entity2id), n_kg_edges=len(entity_kg), n_tokens=len(token2id),
        n_words=len(word2id), n_turns=n_turns,
    )


def _sibling(dest: Path, what: str) -> Path:
    """An unused hidden name next to ``dest`` (same file system, so renames are atomic)."""
    return dest.parent / f".{dest.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _move_into_place(tmp: Path, dest: Path, force: bool) -> None:
    check_destination(dest, force)   # again: the folder may have appeared meanwhile
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if not any(dest.iterdir()):
        dest.rmdir()
        os.rename(tmp, dest)
        return
    old = _sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)   # put the old dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)


def dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
