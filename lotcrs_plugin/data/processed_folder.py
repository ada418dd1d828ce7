"""Reading and checking a processed dataset folder (docs/DATA_LAYOUT.md): every file parsed, ids
and KGs cross-checked, each problem a :class:`UserError` naming the file; crslab is not needed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lotcrs_plugin.errors import UserError

FORMAT = "lotcrs-processed"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
REQUIRED_FILES = ("dataset.json", "train_data.json", "valid_data.json", "test_data.json",
                  "token2id.json", "entity2id.json", "word2id.json", "entity_kg.json",
                  "word_kg.json", "item_ids.json", "item_stats.json")
MIN_ITEMS = 50  # CRSLab's rec metrics take topk(scores[:, item_ids], 50)
ROLES = ("Seeker", "Recommender")
NLTK_SPECIAL = {"__pad__": 0, "__start__": 1, "__end__": 2, "__unk__": 3}
LAYOUT_DOC = "see docs/DATA_LAYOUT.md"


def read_json(folder: Path, name: str, kind: type | None = None) -> Any:
    """Parse one file of the folder; a missing or malformed file is a UserError naming it."""
    path = Path(folder) / name
    if not path.is_file():
        raise UserError(f"{path}: missing; a processed dataset folder needs "
                        f"{', '.join(REQUIRED_FILES)} ({LAYOUT_DOC})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno} column {e.colno}: {e.msg}; expected valid JSON "
                        f"({LAYOUT_DOC})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if kind is not None and not isinstance(data, kind):
        raise UserError(f"{path}: expected a JSON {_kind_name(kind)}, got {_kind_name(type(data))} "
                        f"({LAYOUT_DOC})")
    return data


def _kind_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer"}.get(kind, kind.__name__)


def read_manifest(folder: str | os.PathLike) -> dict:
    """dataset.json of ``folder``, checked (format, version, language, splits)."""
    folder = Path(folder)
    manifest = read_json(folder, "dataset.json", dict)
    path = folder / "dataset.json"
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: \"format\" must be \"{FORMAT}\", got {manifest.get('format')!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r} is not supported; "
                        f"this plugin reads {FORMAT_VERSION}")
    if manifest.get("language", "en") not in ("en", "zh"):
        raise UserError(f"{path}: \"language\" must be \"en\" or \"zh\", got {manifest.get('language')!r}")
    return manifest


def check_folder(folder: str | os.PathLike) -> dict:
    """Cheap check that ``folder`` is a processed dataset: every required file is present and
    dataset.json is valid. Returns the manifest. (``validate_folder`` checks the contents.)"""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such dataset folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder / missing[0]}: missing; a processed dataset folder needs "
                        f"{', '.join(REQUIRED_FILES)} ({LAYOUT_DOC})")
    return read_manifest(folder)


def scan(dataset_root: str | os.PathLike) -> dict[str, Path]:
    """{name: folder} for each direct child of ``dataset_root`` holding a dataset.json (the
    folders the importers write); dataset.json is not read here."""
    root = Path(dataset_root)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "dataset.json").is_file()}


class FolderData:
    """The parsed, cross-checked contents of one processed folder (no tokenization)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        f = self.folder
        self.manifest = check_folder(f)
        self.splits = {s: read_json(f, f"{s}_data.json", list) for s in SPLITS}
        self.token2id = read_json(f, "token2id.json", dict)
        self.entity2id = read_json(f, "entity2id.json", dict)
        self.word2id = read_json(f, "word2id.json", dict)
        self.entity_kg = read_json(f, "entity_kg.json", list)
        self.word_kg = read_json(f, "word_kg.json", list)
        self.item_ids = read_json(f, "item_ids.json", list)
        self.item_stats = read_json(f, "item_stats.json", dict)
        self._check()

    def _check(self) -> None:
        f = self.folder
        _check_ids(f / "token2id.json", self.token2id, first=0, contiguous=True)
        for tok, idx in NLTK_SPECIAL.items():
            if self.token2id.get(tok) != idx:
                raise UserError(f"{f / 'token2id.json'}: {tok} must have id {idx}, "
                                f"got {self.token2id.get(tok)!r} ({LAYOUT_DOC})")
        _check_ids(f / "entity2id.json", self.entity2id, first=1)
        if not self.entity2id:
            raise UserError(f"{f / 'entity2id.json'}: no entities; the items at least are entities")
        _check_ids(f / "word2id.json", self.word2id, first=1)
        entity_ids = set(self.entity2id.values())
        items = self.item_ids
        path = f / "item_ids.json"
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise UserError(f"{path}: expected a list of integer entity ids")
        if len(items) < MIN_ITEMS:
            raise UserError(f"{path}: {len(items)} items; CRSLab ranks the top {MIN_ITEMS}, so a "
                            f"catalog needs at least {MIN_ITEMS} items")
        if len(set(items)) != len(items):
            raise UserError(f"{path}: an entity id occurs twice")
        stray = [i for i in items if i not in entity_ids]
        if stray:
            raise UserError(f"{path}: entity id {stray[0]} is not in entity2id.json")
        path = f / "item_stats.json"
        for i in items:
            entry = self.item_stats.get(str(i))
            if not isinstance(entry, dict) or not isinstance(entry.get("train_mentions"), int):
                raise UserError(f"{path}: item {i} needs an entry {{\"name\", \"train_mentions\": int, "
                                f"\"source_mentions\"}} ({LAYOUT_DOC})")
        self.entity_triples = _kg_triples(f / "entity_kg.json", self.entity_kg, entity_ids)
        self.word_pairs = _kg_pairs(f / "word_kg.json", self.word_kg, set(self.word2id.values()))
        for split, dialogs in self.splits.items():
            if not dialogs:
                raise UserError(f"{f / f'{split}_data.json'}: no dialogs; every split needs at least one")

    def iter_turns(self) -> Iterator[Any]:
        """Every turn of every split, in file order (train, valid, test)."""
        for split in SPLITS:
            for conv in self.splits[split]:
                yield from _dialog_of(self.folder / f"{split}_data.json", conv)


def _check_ids(path: Path, mapping: dict, first: int, contiguous: bool = False) -> None:
    ids = list(mapping.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{path}: every value must be an integer id")
    if not ids:
        return
    arr = np.asarray(ids)
    if arr.min() < first:
        raise UserError(f"{path}: ids start at {first}, found {int(arr.min())} ({LAYOUT_DOC})")
    if len(np.unique(arr)) != len(arr):
        raise UserError(f"{path}: two names share one id")
    if contiguous and arr.max() != first + len(arr) - 1:
        raise UserError(f"{path}: ids must be {first}..{first + len(arr) - 1} without gaps")


def _kg_triples(path: Path, kg: list, entity_ids: set) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(heads, relation names, tails) of entity_kg.json, checked."""
    heads, rels, tails = [], [], []
    for n, triple in enumerate(kg):
        if (not isinstance(triple, list) or len(triple) != 3 or not isinstance(triple[1], str)
                or triple[0] not in entity_ids or triple[2] not in entity_ids):
            raise UserError(f"{path}: triple #{n} {triple!r} is not [head_id, relation_name, tail_id] "
                            f"with ids from entity2id.json")
        heads.append(triple[0])
        rels.append(triple[1])
        tails.append(triple[2])
    return np.asarray(heads, dtype=np.int64), rels, np.asarray(tails, dtype=np.int64)


def _kg_pairs(path: Path, kg: list, word_ids: set) -> np.ndarray:
    for n, pair in enumerate(kg):
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] not in word_ids or pair[1] not in word_ids:
            raise UserError(f"{path}: pair #{n} {pair!r} is not [word_id, word_id] with ids from "
                            f"word2id.json")
    return np.asarray(kg, dtype=np.int64).reshape(-1, 2)


def validate_folder(folder: str | os.PathLike) -> dict:
    """Check a folder completely (files, ids, KGs, every dialog); UserError names the file.
    Returns the manifest."""
    data = FolderData(folder)
    entity2id, word2id, items = data.entity2id, data.word2id, set(data.item_ids)
    for split in SPLITS:
        for conv in data.splits[split]:
            for _ in _checked_turns(data.folder / f"{split}_data.json", conv, entity2id, word2id, items):
                pass
    return data.manifest


def _dialog_of(path: Path, conv: Any) -> list:
    if not isinstance(conv, dict) or not isinstance(conv.get("dialog"), list):
        raise UserError(f"{path}: each dialog must be {{\"conv_id\": str, \"dialog\": [turn, ...]}}, "
                        f"got {str(conv)[:80]!r}")
    return conv["dialog"]


def _checked_turns(path: Path, conv: Any, entity2id: dict, word2id: dict,
                   items: set) -> Iterator[tuple[dict, list[int], list[int], list[int]]]:
    """(turn, movie ids, entity ids, word ids) for each turn of one dialog, checked."""
    for n, utt in enumerate(_dialog_of(path, conv)):
        where = f"{path}: dialog {conv.get('conv_id')!r}, turn {n}"
        if not isinstance(utt, dict) or utt.get("role") not in ROLES:
            raise UserError(f"{where}: role must be \"Seeker\" or \"Recommender\"")
        for key in ("text", "movies", "entity", "word"):
            if not isinstance(utt.get(key), list):
                raise UserError(f"{where}: \"{key}\" must be a list ({LAYOUT_DOC})")
        movie_ids = []
        for movie in utt["movies"]:
            eid = entity2id.get(movie)
            if eid is None or eid not in items:
                raise UserError(f"{where}: movie {movie!r} is not an item (entity2id.json and "
                                f"item_ids.json must both list it)")
            movie_ids.append(eid)
        entity_ids = [entity2id[e] for e in utt["entity"] if e in entity2id]
        word_ids = [word2id[w] for w in utt["word"] if w in word2id]
        yield utt, movie_ids, entity_ids, word_ids
