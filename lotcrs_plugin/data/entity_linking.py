"""Attribute mentions in free text (a user's message in ``--interact``), linked to the entity names
that a dataset's turns list under ``entity``, so that a typed message reaches the model as a test
turn does (lotcrs_plugin.data.turns marks those spans as keywords).

An attribute (genre, person, ...) of the catalog is found by the spellings the recommendation
samples use (its entity name and display names), at word boundaries, longest first; a spelling of
fewer than 3 characters is not looked for (it would match inside ordinary words).
"""

from __future__ import annotations

import os

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.item_vocab import _attribute_surfaces, _find_all

MIN_CHARS = 3


class AttributeLinker:
    """``linker(text)``: the entity names of the catalog attributes named in ``text``, in order."""

    def __init__(self, entity_names: list[str | None], display_names: list[str]):
        spellings: dict[str, str] = {}
        for entity, shown in zip(entity_names, display_names):
            if not entity:
                continue  # an attribute without an entity is not in the dialogs' entity lists
            for s in (*_attribute_surfaces(entity), shown.strip().lower()):
                if len(s) >= MIN_CHARS:
                    spellings.setdefault(s, entity)
        self.spellings = sorted(spellings.items(), key=lambda kv: -len(kv[0]))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "AttributeLinker":
        catalog = Catalog.from_folder(folder)
        return cls(catalog.attr_entity_names, catalog.attr_names)

    def __call__(self, text: str) -> list[str]:
        lower = text.lower()
        taken: list[tuple[int, int]] = []
        found: list[tuple[int, str]] = []
        for spelling, entity in self.spellings:  # longest first: "science fiction" before "fiction"
            if spelling not in lower:
                continue
            for i, j in _find_all(lower, spelling):
                if any(i < b and a < j for a, b in taken):
                    continue
                taken.append((i, j))
                found.append((i, entity))
        return list(dict.fromkeys(e for _, e in sorted(found)))


__all__ = ["AttributeLinker"]
