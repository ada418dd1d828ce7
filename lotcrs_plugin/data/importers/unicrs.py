"""The UniCRS input format (as for INSPIRED and ReDial in wxl1999/UniCRS): one dialog per line, a
JSON list of turns ``{text, role: SEEKER/RECOMMENDER, movie[], movie_name[], movie_link[],
entity_name[], entity_link[]}``, with entity2id.json, item_ids.json, dbpedia_subkg.json and
relation2id.json in a KG folder.

Entity names are the DBpedia URIs (as CRSLab's INSPIRED); the file's ids 0..n-1 become 1..n in
the same order, since 0 is padding in the layout. A linked movie that is not a catalog item is an
ordinary entity; an entity link that is an item is left out of ``entity`` (the layout keeps items
in ``movies``, and only the annotated movie links are items there). Self-loop edges are dropped:
readers add them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lotcrs_plugin.data.importers.common import (
    Catalog,
    RawDialog,
    RawTurn,
    dedupe,
    iter_jsonl,
    read_json,
    require_file,
)
from lotcrs_plugin.errors import UserError

KG_FILES = ("entity2id.json", "item_ids.json", "dbpedia_subkg.json", "relation2id.json")
ROLE_MAP = {"SEEKER": "Seeker", "RECOMMENDER": "Recommender"}


def _local_name(uri: str) -> str:
    """'<http://dbpedia.org/ontology/starring>' -> 'starring'."""
    s = uri.strip().strip("<>")
    return s.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1] or uri


class UnicrsReader:
    def __init__(self, kg_dir: Path) -> None:
        self.kg_dir = kg_dir
        if not kg_dir.is_dir():
            raise UserError(f"--kg-dir: folder not found: {kg_dir} (give the folder holding {', '.join(KG_FILES)})")
        paths = {f: require_file(kg_dir / f, f"UniCRS KG file {f}") for f in KG_FILES}
        self._read_entities(paths["entity2id.json"], paths["item_ids.json"])
        self._read_kg(paths["dbpedia_subkg.json"], paths["relation2id.json"])
        self.n_entity_links_unknown = 0
        self.n_entity_links_items = 0

    def _read_entities(self, e_path: Path, i_path: Path) -> None:
        e2i = read_json(e_path, "entity2id")
        if not isinstance(e2i, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in e2i.values()):
            raise UserError(f"{e_path}: expected a JSON object {{entity name: integer id}}")
        by_id: dict[int, str] = {}
        for name, i in e2i.items():
            if i in by_id:
                raise UserError(f"{e_path}: id {i} is given to both {by_id[i]!r} and {name!r}")
            by_id[i] = name
        self.entities = [by_id[i] for i in sorted(by_id)]
        self.name_of = by_id
        items = read_json(i_path, "item ids")
        if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise UserError(f"{i_path}: expected a JSON list of integer entity ids")
        for i in items:
            if i not in by_id:
                raise UserError(f"{i_path}: item id {i} is not an id of {e_path.name}")
        if len(set(items)) != len(items):
            raise UserError(f"{i_path}: an item id occurs twice; each item must be listed once")
        self.item_names = [by_id[i] for i in items]
        self.item_set = set(self.item_names)
        self.e2i = e2i

    def _read_kg(self, kg_path: Path, rel_path: Path) -> None:
        r2i = read_json(rel_path, "relation2id")
        if not isinstance(r2i, dict) or not all(isinstance(v, int) for v in r2i.values()):
            raise UserError(f"{rel_path}: expected a JSON object {{relation name: integer id}}")
        local = {r: _local_name(r) for r in r2i}
        clash = {n for n in local.values() if list(local.values()).count(n) > 1}
        # short names where they are unambiguous, the full URI otherwise
        rel_name = {i: (local[r] if local[r] not in clash else r) for r, i in r2i.items()}
        kg = read_json(kg_path, "DBpedia sub-KG")
        if not isinstance(kg, dict):
            raise UserError(f"{kg_path}: expected a JSON object {{head id: [[relation id, tail id], ...]}}")
        edges: dict[tuple[str, str, str], None] = {}
        n_loops = 0
        for head, pairs in kg.items():
            try:
                h = self.name_of[int(head)]
            except (ValueError, KeyError):
                raise UserError(f"{kg_path}: head {head!r} is not an id of entity2id.json") from None
            if not isinstance(pairs, list):
                raise UserError(f"{kg_path}: head {head}: expected a list of [relation id, tail id]")
            for pair in pairs:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise UserError(f"{kg_path}: head {head}: {pair!r} is not a [relation id, tail id] pair")
                r, t = pair
                if r not in rel_name:
                    raise UserError(f"{kg_path}: head {head}: relation id {r} is not in {rel_path.name}")
                if t not in self.name_of:
                    raise UserError(f"{kg_path}: head {head}: tail id {t} is not an id of entity2id.json")
                if rel_name[r] == "self_loop" or t == int(head):
                    n_loops += 1
                    continue
                edges[(h, rel_name[r], self.name_of[t])] = None
        self.kg = list(edges)
        self.n_self_loops_dropped = n_loops

    def catalog(self) -> Catalog:
        return Catalog(entities=self.entities, item_names=self.item_names, kg=self.kg, source_mentions=None)

    def source_info(self) -> dict[str, Any]:
        return {
            "kg_dir": str(self.kg_dir.resolve()),
            "entity_ids": "the file's ids + 1 (0 is padding)",
            "self_loop_edges_dropped": self.n_self_loops_dropped,
            "entity_links_not_in_entity2id_dropped": self.n_entity_links_unknown,
            "entity_links_to_items_left_out": self.n_entity_links_items,
        }

    def read_dialogs(self, path: Path, split: str) -> list[RawDialog]:
        dialogs = []
        e2i, items = self.e2i, self.item_set
        for lineno, turns in iter_jsonl(path):
            where = f"{path}:{lineno}"
            if not isinstance(turns, list):
                raise UserError(f"{where}: expected a JSON list of turns (the UniCRS format)")
            out = []
            for k, turn in enumerate(turns):
                if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
                    raise UserError(f"{where}: turn {k} must be an object with a string 'text'")
                role = ROLE_MAP.get(str(turn.get("role", "")).upper())
                if role is None:
                    raise UserError(f"{where}: turn {k} has role {turn.get('role')!r}; expected SEEKER or RECOMMENDER")
                movies, entity = [], []
                for link in turn.get("movie_link") or []:
                    if link not in e2i:
                        raise UserError(f"{where}: turn {k}: unknown movie {link!r} (not in entity2id.json)")
                    (movies if link in items else entity).append(link)
                for link in turn.get("entity_link") or []:
                    if link not in e2i:
                        self.n_entity_links_unknown += 1
                    elif link in items:
                        self.n_entity_links_items += 1
                    else:
                        entity.append(link)
                out.append(RawTurn(role=role, raw_text=" ".join(turn["text"].split()),
                                   movies=dedupe(movies), entity=dedupe(entity)))
            if out:
                dialogs.append(RawDialog(conv_id=f"{split}-{lineno}", turns=out, where=where))
        return dialogs
