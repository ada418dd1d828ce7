"""The item catalog of a processed dataset folder (docs/DATA_LAYOUT.md): items, their display
names, training popularity and attributes by slot kind (genre, star, director, ...).

Attributes come from ``entity_kg.json`` (relation names mapped to slot kinds by
:data:`RELATION_KINDS`) and, when the KG lacks one of genre / star / director / writer, from the
optional ``item_attributes.json`` too; both are merged, one attribute per (kind, entity). They are held CSR-like in numpy arrays (item -> attributes sorted
by kind, attribute -> items) so that the simulator samples threads for many items at once.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lotcrs_plugin.errors import UserError

# Relation name (local part, lowercased, letters and digits only) -> slot kind. DBpedia's
# ontology names (INSPIRED via UniCRS), the ReDial importer's names, and common synonyms.
RELATION_KINDS: dict[str, str] = {
    "genre": "genre", "genres": "genre", "hasgenre": "genre",
    "star": "star", "stars": "star", "starring": "star", "actor": "star", "actors": "star",
    "cast": "star", "castmember": "star",
    "director": "director", "directors": "director", "directedby": "director",
    "writer": "writer", "writers": "writer", "writtenby": "writer", "screenplay": "writer",
    "author": "writer",
    "producer": "producer", "producers": "producer", "producedby": "producer",
    "executiveproducer": "producer",
    "musiccomposer": "composer", "composer": "composer", "music": "composer",
    "cinematography": "cinematographer", "cinematographer": "cinematographer",
    "editing": "editor", "editor": "editor", "filmeditor": "editor",
    "productioncompany": "company", "productioncompanies": "company", "studio": "company",
    "distributor": "distributor",
    "country": "country",
    "language": "language", "originallanguage": "language",
}
# Kinds in the order they are listed; kinds of unmapped relations follow, sorted.
CANONICAL_KINDS: tuple[str, ...] = (
    "genre", "star", "director", "writer", "producer", "composer", "cinematographer", "editor",
    "company", "distributor", "country", "language",
)
_SKIPPED_RELATIONS = {"selfloop", "self", ""}
# item_attributes.json keys that are not attribute lists
_NON_ATTRIBUTE_KEYS = {"plot", "name", "imdbid", "year", "title", "overview"}

_DUP_SUFFIX = re.compile(r"\s*\[\d+\]$")                 # "Name [12345]": the importer's clash suffix
_KIND_SUFFIX = re.compile(r"\s*\((genre|person)\)$")     # "Dune (genre)": the importer's clash suffix
_PERSON_FUNCTION = re.compile(r"__\w+?__\d+$")            # DBpedia "X__PersonFunction__1"
_FILM_YEAR = re.compile(r"\((\d{4}) (?:[\w ]*?)?film\)$", re.IGNORECASE)
_PAREN_TAIL = re.compile(r"\s*\([^()]*\)$")
_GENRE_TAIL = re.compile(r"\s+(films?|movies?|genre)$", re.IGNORECASE)


def normalize_relation(name: str) -> str:
    """'<http://dbpedia.org/ontology/musicComposer>' -> 'musiccomposer'."""
    s = str(name).strip().strip("<>").rstrip("/")
    s = s.rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    return re.sub(r"[^a-z0-9]", "", s.lower())


def relation_kind(name: str) -> str | None:
    """The slot kind of a relation name; None for self loops. Unmapped names are their own kind."""
    n = normalize_relation(name)
    if n in _SKIPPED_RELATIONS:
        return None
    return RELATION_KINDS.get(n, n)


def _uri_local(name: str) -> str | None:
    s = name.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    if "://" not in s:
        return None
    return urllib.parse.unquote(s.rstrip("/").rsplit("/", 1)[-1])


def item_display_name(name: str) -> str:
    """How an item is written in text: 'Joker (2019)' for '<.../Joker_(2019_film)>'."""
    local = _uri_local(name)
    if local is not None:
        s = local.replace("_", " ")
        m = _FILM_YEAR.search(s)
        if m:
            s = s[: m.start()] + f"({m.group(1)})"
        elif re.search(r"\((film|movie)\)$", s, re.IGNORECASE):
            s = _PAREN_TAIL.sub("", s)
    else:
        s = _DUP_SUFFIX.sub("", name)
    return " ".join(s.split()) or name


def attribute_display_name(name: str, kind: str) -> str:
    """How an attribute is written in text: 'Chris Evans' for '<.../Chris_Evans_(actor)>',
    'action' for the genre '<.../Action_film>'."""
    local = _uri_local(name)
    if local is not None:
        s = _PERSON_FUNCTION.sub("", local).replace("_", " ")
        s = _PAREN_TAIL.sub("", s)
    else:
        s = _KIND_SUFFIX.sub("", name)
    s = " ".join(s.split())
    if kind == "genre":
        stripped = _GENRE_TAIL.sub("", s)
        s = (stripped or s).lower()
    return s or name


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: the {what} is missing; give a processed dataset folder "
                        f"(docs/DATA_LAYOUT.md, made by `crslab import-data`)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON in the {what} ({e.msg})") from None


def _kind_order(kinds: set[str]) -> list[str]:
    return [k for k in CANONICAL_KINDS if k in kinds] + sorted(kinds - set(CANONICAL_KINDS))


@dataclass
class Catalog:
    """Items and attributes of one dataset folder; build with :meth:`from_folder`.

    Items are indexed 0..n_items-1 in catalog order (item_ids.json), attributes 0..n_attrs-1.
    ``item_attr_indices[item_attr_indptr[i]:item_attr_indptr[i+1]]`` are item i's attributes,
    sorted by kind; ``item_kind_start[i, k]`` / ``item_kind_counts[i, k]`` locate those of kind k.
    ``attr_item_indices[attr_item_indptr[a]:attr_item_indptr[a+1]]`` are the items having a.
    """

    folder: Path
    item_entity_ids: np.ndarray          # (n_items,) entity ids
    item_entity_names: list[str]         # entity2id names (what dialogs list in "movies")
    item_names: list[str]                # display names (what simulated text says)
    popularity: np.ndarray               # (n_items,) train_mentions
    kinds: list[str]                     # attribute kinds, kind index -> name
    attr_kind: np.ndarray                # (n_attrs,) kind index
    attr_names: list[str]                # display names
    attr_entity_names: list[str | None]  # entity2id name, or None for a value of item_attributes.json only
    item_attr_indptr: np.ndarray
    item_attr_indices: np.ndarray
    attr_item_indptr: np.ndarray
    attr_item_indices: np.ndarray
    item_kind_counts: np.ndarray         # (n_items, n_kinds) int32
    item_kind_start: np.ndarray          # (n_items, n_kinds) int64, offsets into item_attr_indices
    relations: dict[str, str] = field(default_factory=dict)   # relation name seen -> kind
    entity_attribute: dict[str, int] = field(default_factory=dict)  # entity name -> main attribute

    # ------------------------------------------------------------------ sizes
    @property
    def n_items(self) -> int:
        return len(self.item_names)

    @property
    def n_attributes(self) -> int:
        return len(self.attr_names)

    @property
    def attr_degree(self) -> np.ndarray:
        return np.diff(self.attr_item_indptr)

    @property
    def item_degree(self) -> np.ndarray:
        return np.diff(self.item_attr_indptr)

    def kind_index(self, kind: str) -> int:
        try:
            return self.kinds.index(kind)
        except ValueError:
            raise UserError(f"unknown attribute kind {kind!r}; this catalog has: "
                            f"{', '.join(self.kinds) or '(none)'}") from None

    def attributes_of(self, item: int, kind: str | None = None) -> list[str]:
        """Display names of item ``item``'s attributes (of one kind, or all)."""
        if kind is None:
            lo, hi = self.item_attr_indptr[item], self.item_attr_indptr[item + 1]
        else:
            k = self.kind_index(kind)
            lo = self.item_kind_start[item, k]
            hi = lo + self.item_kind_counts[item, k]
        return [self.attr_names[a] for a in self.item_attr_indices[lo:hi]]

    def kind_of_entity(self, entity_name: str) -> str | None:
        a = self.entity_attribute.get(entity_name)
        return None if a is None else self.kinds[int(self.attr_kind[a])]

    def summary(self) -> dict[str, Any]:
        deg = self.item_degree
        return {
            "items": self.n_items,
            "attributes": self.n_attributes,
            "kinds": {k: int((self.attr_kind == i).sum()) for i, k in enumerate(self.kinds)},
            "items_without_attributes": int((deg == 0).sum()),
            "item_attribute_links": int(deg.sum()),
            "relations": dict(self.relations),
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path) -> "Catalog":
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"dataset folder not found: {folder} (give a folder made by `crslab import-data`)")
        entity2id = _read_json(folder / "entity2id.json", "entity2id.json (entity name -> id)")
        item_ids = _read_json(folder / "item_ids.json", "item_ids.json (the catalog's entity ids)")
        if not isinstance(entity2id, dict) or not isinstance(item_ids, list):
            raise UserError(f"{folder}: entity2id.json must be an object and item_ids.json a list")
        max_id = max(entity2id.values(), default=0)
        name_of: list[str | None] = [None] * (max_id + 1)
        for name, i in entity2id.items():
            name_of[i] = name
        for i in item_ids:
            if not isinstance(i, int) or not 0 <= i <= max_id or name_of[i] is None:
                raise UserError(f"{folder / 'item_ids.json'}: item id {i!r} is not an id of entity2id.json")
        if not item_ids:
            raise UserError(f"{folder / 'item_ids.json'}: the catalog has no items")
        n_items = len(item_ids)
        item_entity_ids = np.asarray(item_ids, dtype=np.int64)
        item_of_entity = np.full(max_id + 1, -1, dtype=np.int64)
        item_of_entity[item_entity_ids] = np.arange(n_items)

        stats_path = folder / "item_stats.json"
        stats = _read_json(stats_path, "item_stats.json") if stats_path.is_file() else {}
        popularity = np.zeros(n_items, dtype=np.int64)
        item_entity_names: list[str] = []
        item_names: list[str] = []
        for k, eid in enumerate(item_ids):
            s = stats.get(str(eid)) or {}
            popularity[k] = int(s.get("train_mentions") or 0)
            ename = name_of[eid]
            item_entity_names.append(ename)
            item_names.append(item_display_name(str(s.get("name") or ename)))

        # attributes: key (kind, entity name or "~display") -> index
        keys: dict[tuple[str, str], int] = {}
        a_kind_name: list[str] = []
        a_entity: list[str | None] = []
        a_display: list[str] = []
        pair_items: list[np.ndarray] = []
        pair_attrs: list[np.ndarray] = []
        relations: dict[str, str] = {}

        def attr_index(kind: str, entity: str | None, display: str) -> int:
            key = (kind, entity if entity is not None else "~" + display.lower())
            a = keys.get(key)
            if a is None:
                a = keys[key] = len(a_kind_name)
                a_kind_name.append(kind)
                a_entity.append(entity)
                a_display.append(display)
            return a

        kg_path = folder / "entity_kg.json"
        if kg_path.is_file():
            kg = _read_json(kg_path, "entity_kg.json")
            if not isinstance(kg, list):
                raise UserError(f"{kg_path}: expected a list of [head_id, relation_name, tail_id]")
            n = len(kg)
            try:
                heads = np.fromiter((t[0] for t in kg), dtype=np.int64, count=n)
                tails = np.fromiter((t[2] for t in kg), dtype=np.int64, count=n)
                rel_names = [t[1] for t in kg]
            except (TypeError, IndexError, ValueError):
                raise UserError(f"{kg_path}: every edge must be [head_id, relation_name, tail_id]") from None
            del kg
            if n and (heads.min() < 0 or tails.min() < 0 or heads.max() > max_id or tails.max() > max_id):
                raise UserError(f"{kg_path}: an edge names an id outside entity2id.json (0..{max_id})")
            rel_codes: dict[str, int] = {}
            codes = np.fromiter((rel_codes.setdefault(r, len(rel_codes)) for r in rel_names),
                                dtype=np.int64, count=n)
            rel_kind = []
            for r in rel_codes:
                kind = relation_kind(r)
                rel_kind.append(kind)
                if kind is not None:
                    relations[str(r)] = kind
            kind_ok = np.array([k is not None for k in rel_kind] + [False], dtype=bool)[codes]
            h_item, t_item = item_of_entity[heads], item_of_entity[tails]
            # item -rel-> value, or value -rel-> item; item-item edges are not attributes
            fwd = kind_ok & (h_item >= 0) & (t_item < 0)
            bwd = kind_ok & (t_item >= 0) & (h_item < 0)
            items_ = np.concatenate([h_item[fwd], t_item[bwd]])
            values = np.concatenate([tails[fwd], heads[bwd]])
            vcodes = np.concatenate([codes[fwd], codes[bwd]])
            if len(items_):
                # one attribute per distinct (value entity, kind): index them in first-seen order
                kind_names = sorted({rel_kind[c] for c in np.unique(vcodes)})
                kind_code = {k: i for i, k in enumerate(kind_names)}
                vk = np.array([kind_code.get(rel_kind[c], 0) for c in range(len(rel_kind))],
                              dtype=np.int64)[vcodes]
                combo = values * len(kind_names) + vk
                uniq, first, inverse = np.unique(combo, return_index=True, return_inverse=True)
                order = np.argsort(first, kind="stable")
                local = np.empty(len(uniq), dtype=np.int64)
                for u in order:
                    value, k = divmod(int(uniq[u]), len(kind_names))
                    kind = kind_names[k]
                    ename = name_of[value]
                    local[u] = attr_index(kind, ename, attribute_display_name(ename, kind))
                pair_items.append(items_)
                pair_attrs.append(local[inverse.reshape(-1)])

        # the attribute file repeats the KG in the importer's and the generator's folders: it is
        # read (and merged) only when the KG lacks one of the main kinds, which saves a large load
        attr_path = folder / "item_attributes.json"
        kg_kinds = set(a_kind_name)
        if attr_path.is_file() and not {"genre", "star", "director", "writer"} <= kg_kinds:
            data = _read_json(attr_path, "item_attributes.json")
            if not isinstance(data, dict):
                raise UserError(f"{attr_path}: expected an object {{entity id: {{kind: [values]}}}}")
            # a value is linked to its entity when an entity of that name exists
            lower_entities: dict[str, str] = {}
            for name in entity2id:
                lower_entities.setdefault(name.lower(), name)
            it_list: list[int] = []
            at_list: list[int] = []
            for key, attrs in data.items():
                try:
                    item = int(item_of_entity[int(key)]) if 0 <= int(key) <= max_id else -1
                except ValueError:
                    item = -1
                if item < 0:
                    raise UserError(f"{attr_path}: key {key!r} is not the entity id of a catalog item")
                if not isinstance(attrs, dict):
                    raise UserError(f"{attr_path}: the attributes of item {key} are not an object")
                for rel, values in attrs.items():
                    if normalize_relation(rel) in _NON_ATTRIBUTE_KEYS or not isinstance(values, list):
                        continue
                    kind = relation_kind(rel)
                    if kind is None:
                        continue
                    relations.setdefault(str(rel), kind)
                    for v in values:
                        if not isinstance(v, str) or not v.strip():
                            continue
                        v = " ".join(v.split())
                        ename = None
                        for cand in (v, f"{v} ({'genre' if kind == 'genre' else 'person'})"):
                            hit = lower_entities.get(cand.lower())
                            if hit is not None and item_of_entity[entity2id[hit]] < 0:
                                ename = hit
                                break
                        display = attribute_display_name(ename, kind) if ename else (
                            v.lower() if kind == "genre" else v)
                        it_list.append(item)
                        at_list.append(attr_index(kind, ename, display))
            pair_items.append(np.asarray(it_list, dtype=np.int64))
            pair_attrs.append(np.asarray(at_list, dtype=np.int64))

        return cls._assemble(folder, item_entity_ids, item_entity_names, item_names, popularity,
                             a_kind_name, a_entity, a_display, pair_items, pair_attrs, relations)

    @classmethod
    def _assemble(cls, folder, item_entity_ids, item_entity_names, item_names, popularity,
                  a_kind_name, a_entity, a_display, pair_items, pair_attrs, relations) -> "Catalog":
        n_items = len(item_names)
        kinds = _kind_order(set(a_kind_name))
        kcode = {k: i for i, k in enumerate(kinds)}
        n_kinds = len(kinds)
        # renumber attributes by (kind, display name) so that the order is content-defined
        n_attrs = len(a_kind_name)
        order = sorted(range(n_attrs), key=lambda a: (kcode[a_kind_name[a]], a_display[a].lower(),
                                                      a_entity[a] or ""))
        new_of_old = np.empty(n_attrs, dtype=np.int64)
        new_of_old[order] = np.arange(n_attrs)
        attr_kind = np.array([kcode[a_kind_name[a]] for a in order], dtype=np.int32)
        attr_names = [a_display[a] for a in order]
        attr_entity = [a_entity[a] for a in order]

        items_ = np.concatenate(pair_items) if pair_items else np.zeros(0, dtype=np.int64)
        attrs_ = new_of_old[np.concatenate(pair_attrs)] if pair_attrs else np.zeros(0, dtype=np.int64)
        # unique (item, attribute) pairs; attributes are kind-sorted, so items' lists are too
        combo = np.unique(items_ * max(n_attrs, 1) + attrs_)
        items_, attrs_ = combo // max(n_attrs, 1), combo % max(n_attrs, 1)
        item_attr_indptr = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(items_, minlength=n_items), out=item_attr_indptr[1:])
        item_attr_indices = attrs_.astype(np.int64)
        by_attr = np.lexsort((items_, attrs_))
        attr_item_indptr = np.zeros(n_attrs + 1, dtype=np.int64)
        np.cumsum(np.bincount(attrs_, minlength=n_attrs), out=attr_item_indptr[1:])
        attr_item_indices = items_[by_attr].astype(np.int64)

        kc = np.bincount(items_ * max(n_kinds, 1) + attr_kind[attrs_],
                         minlength=n_items * max(n_kinds, 1)).reshape(n_items, max(n_kinds, 1))[:, :n_kinds]
        item_kind_counts = kc.astype(np.int32)
        item_kind_start = item_attr_indptr[:-1, None] + np.concatenate(
            [np.zeros((n_items, 1), dtype=np.int64), np.cumsum(kc, axis=1)[:, :-1]], axis=1)

        # an entity that is several kinds (a director who also stars) is slotted as its most linked kind
        deg = np.diff(attr_item_indptr)
        entity_attribute: dict[str, int] = {}
        for a, ename in enumerate(attr_entity):
            if ename is None:
                continue
            b = entity_attribute.get(ename)
            if b is None or deg[a] > deg[b]:
                entity_attribute[ename] = a
        return cls(
            folder=folder, item_entity_ids=item_entity_ids, item_entity_names=item_entity_names,
            item_names=item_names, popularity=popularity, kinds=kinds, attr_kind=attr_kind,
            attr_names=attr_names, attr_entity_names=attr_entity, item_attr_indptr=item_attr_indptr,
            item_attr_indices=item_attr_indices, attr_item_indptr=attr_item_indptr,
            attr_item_indices=attr_item_indices, item_kind_counts=item_kind_counts,
            item_kind_start=item_kind_start.astype(np.int64), relations=relations,
            entity_attribute=entity_attribute,
        )


__all__ = ["CANONICAL_KINDS", "RELATION_KINDS", "Catalog", "attribute_display_name",
           "item_display_name", "normalize_relation", "relation_kind"]
