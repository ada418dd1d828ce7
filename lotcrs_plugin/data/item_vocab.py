"""The catalog's items as the dialogs name them (:class:`ItemVocab`), and how an item or an
attribute is found in a turn's text (its spellings, matched at word boundaries)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lotcrs_plugin.errors import UserError

_TRAILING_PAREN = re.compile(r"\s*\([^()]*\)\s*$")


@dataclass
class ItemVocab:
    """The catalog in its order: item k has entity id ``entity_ids[k]``, is named
    ``entity_names[k]`` in dialogs (``movies``) and written ``display_names[k]`` in text."""

    entity_ids: list[int]
    entity_names: list[str]
    display_names: list[str]
    index_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index_of = {name: k for k, name in enumerate(self.entity_names)}

    def __len__(self) -> int:
        return len(self.entity_ids)

    @classmethod
    def from_side_data(cls, side_data: Mapping[str, Any], vocab: Mapping[str, Any]) -> "ItemVocab":
        """From a CRSLab dataset of the processed layout (side_data item_entity_ids/item_stats)."""
        ids = side_data.get("item_entity_ids")
        if not ids:
            raise UserError("the dataset gives no item list (side_data['item_entity_ids']); pre-training reads a "
                            "processed dataset (docs/DATA_LAYOUT.md)")
        id2entity = vocab["id2entity"]
        stats = side_data.get("item_stats") or {}
        names = [id2entity[i] for i in ids]
        shown = [(stats.get(i) or {}).get("name") or n for i, n in zip(ids, names)]
        return cls([int(i) for i in ids], names, [_display(n) for n in shown])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ItemVocab":
        """From a processed dataset folder (item_ids.json, entity2id.json, item_stats.json)."""
        folder = Path(folder)
        ids = json.loads((folder / "item_ids.json").read_text(encoding="utf-8"))
        entity2id = json.loads((folder / "entity2id.json").read_text(encoding="utf-8"))
        stats = json.loads((folder / "item_stats.json").read_text(encoding="utf-8"))
        id2entity = {i: e for e, i in entity2id.items()}
        names = [id2entity[i] for i in ids]
        shown = [(stats.get(str(i)) or {}).get("name") or n for i, n in zip(ids, names)]
        return cls([int(i) for i in ids], names, [_display(n) for n in shown])


def _display(name: str) -> str:
    from lotcrs_plugin.data.catalog import item_display_name

    return item_display_name(name)


def _surfaces(*names: str) -> tuple[str, ...]:
    """Distinct lowercased spellings, longest first (the longest match wins)."""
    out = {n.strip().lower() for n in names if n and n.strip()}
    return tuple(sorted(out, key=len, reverse=True))


def _item_surfaces(entity_name: str, display: str) -> tuple[tuple[str, bool], ...]:
    """(spelling, match every occurrence): a name without its "(year)" can be a common word
    ("It"), so only its first occurrence counts."""
    full = _surfaces(entity_name, display)
    short = _surfaces(_TRAILING_PAREN.sub("", display))
    return tuple((s, True) for s in full) + tuple((s, False) for s in short if s not in full)


def _attribute_surfaces(name: str) -> tuple[str, ...]:
    from lotcrs_plugin.data.catalog import attribute_display_name

    return _surfaces(name, attribute_display_name(name, "genre"), attribute_display_name(name, "person"))


def _find_all(lower: str, surface: str) -> list[tuple[int, int]]:
    """Occurrences of ``surface`` in ``lower`` that start and end at word boundaries."""
    out, start, n = [], 0, len(surface)
    while True:
        i = lower.find(surface, start)
        if i < 0:
            return out
        j = i + n
        if (i == 0 or not lower[i - 1].isalnum()) and (j == len(lower) or not lower[j].isalnum()):
            out.append((i, j))
        start = i + 1
