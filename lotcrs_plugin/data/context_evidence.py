"""What a dialog already says about its answer, as arrays per sample: the items named in the
context (with who named them and how recently) and the attribute entities named in it, and the
catalog's item -> attribute table they are matched against.

The model's evidence term (lotcrs_plugin.model.evidence) turns these into learned score bonuses.
The whole context counts, also the part that truncation to ``max_length`` tokens cuts from the
encoder's input: a movie the seeker named twenty turns ago is still evidence.

Item features (:data:`ITEM_FEATURES`), per (sample, context item):
named by the seeker, named by the recommender, log(1 + times named), named in the last turn,
named in the last three turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lotcrs_plugin.data.turns import TurnTable
from lotcrs_plugin.errors import UserError

ITEM_FEATURES = ("by_seeker", "by_recommender", "log_count", "last_turn", "last_3_turns")
SELF_LOOP = "self_loop"


@dataclass
class EvidenceBatch:
    """items (B, M) long catalog indices, -1 = padding; item_features (B, M, F) float;
    entities (B, E) long dataset entity ids of the attributes named in the context, 0 = padding;
    entity_counts (B, E) float how often each was named."""

    items: torch.Tensor
    item_features: torch.Tensor
    entities: torch.Tensor
    entity_counts: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EvidenceBatch":
        return EvidenceBatch(*(t.to(device, non_blocking=non_blocking) for t in
                               (self.items, self.item_features, self.entities, self.entity_counts)))

    def pin_memory(self) -> "EvidenceBatch":
        return EvidenceBatch(*(t.pin_memory() for t in
                               (self.items, self.item_features, self.entities, self.entity_counts)))


class EvidenceBuilder:
    """Builds :class:`EvidenceBatch` es for contexts of one :class:`TurnTable`.

    ``recommender``: (n_turns,) bool, the turn is the Recommender's (None: every turn counts as the
    seeker's, e.g. for simulated dialogs read without roles). ``item_entity_ids``: the catalog's
    entity ids (their mentions are items, not attributes). ``mask_target``: the sample's target is
    hidden in its context (simulated samples): it is not evidence for itself.
    """

    def __init__(self, table: TurnTable, recommender: np.ndarray | None, item_entity_ids: Sequence[int]):
        self.table = table
        n = table.n_turns
        self.recommender = np.zeros(n, bool) if recommender is None else np.asarray(recommender, bool)
        if self.recommender.shape[0] != n:
            raise ValueError(f"EvidenceBuilder: {self.recommender.shape[0]} roles for {n} turns")
        self.is_item_entity = np.zeros(int(max(item_entity_ids, default=0)) + 1, bool)
        self.is_item_entity[np.asarray(item_entity_ids, dtype=np.int64)] = True
        self.turn_of_mention = np.repeat(np.arange(n), np.diff(table.item_offsets))

    def _is_attribute(self, ent: np.ndarray) -> np.ndarray:
        inside = ent < self.is_item_entity.shape[0]
        item = np.zeros(ent.shape, bool)
        item[inside] = self.is_item_entity[ent[inside]]
        return (ent > 0) & ~item

    def batch(self, contexts: np.ndarray, hidden_targets: np.ndarray | None = None) -> EvidenceBatch:
        """contexts: (B, 2) turn ranges [first, cut); hidden_targets: (B,) an item per sample that
        is not evidence (the masked target of a simulated sample), or None. Array code over the
        whole batch: every sample's mentions in one flat array, grouped by (sample, item)."""
        t = self.table
        contexts = np.asarray(contexts, dtype=np.int64).reshape(-1, 2)
        first, cut = contexts[:, 0], contexts[:, 1]
        n = len(contexts)
        sample, at = _segments(t.item_offsets[first], t.item_offsets[cut])
        items = t.turn_items[at].astype(np.int64)
        turns = self.turn_of_mention[at]
        if hidden_targets is not None:
            keep = items != np.asarray(hidden_targets, dtype=np.int64)[sample]
            sample, items, turns = sample[keep], items[keep], turns[keep]
        # one group per (sample, item), sorted by sample then item as np.unique sorts each sample's
        keys, group = np.unique(sample * (int(items.max(initial=0)) + 1) + items, return_inverse=True)
        group_sample = np.zeros(len(keys), np.int64)
        group_sample[group] = sample
        group_item = np.zeros(len(keys), np.int64)
        group_item[group] = items
        feats = np.zeros((len(keys), len(ITEM_FEATURES)), np.float32)
        if len(keys):
            rec = self.recommender[turns]
            last = cut[sample]
            np.maximum.at(feats[:, 0], group, (~rec).astype(np.float32))
            np.maximum.at(feats[:, 1], group, rec.astype(np.float32))
            feats[:, 2] = np.log1p(np.bincount(group, minlength=len(keys)))
            np.maximum.at(feats[:, 3], group, (turns == last - 1).astype(np.float32))
            np.maximum.at(feats[:, 4], group, (turns >= last - 3).astype(np.float32))
        item_rows, item_cols, width = _places(group_sample, n)
        out_items = np.full((n, width), -1, np.int64)
        out_items[item_rows, item_cols] = group_item
        out_feats = np.zeros((n, width, len(ITEM_FEATURES)), np.float32)
        out_feats[item_rows, item_cols] = feats

        e_sample, e_at = _segments(t.turn_offsets[first], t.turn_offsets[cut])
        ent = t.entity[e_at].astype(np.int64)
        attribute = self._is_attribute(ent)
        e_sample, ent = e_sample[attribute], ent[attribute]
        e_keys, e_group, e_count = np.unique(e_sample * (int(ent.max(initial=0)) + 1) + ent,
                                             return_inverse=True, return_counts=True)
        e_group_sample = np.zeros(len(e_keys), np.int64)
        e_group_sample[e_group] = e_sample
        e_group_ent = np.zeros(len(e_keys), np.int64)
        e_group_ent[e_group] = ent
        ent_rows, ent_cols, e_width = _places(e_group_sample, n)
        out_ent = np.zeros((n, e_width), np.int64)
        out_ent[ent_rows, ent_cols] = e_group_ent
        out_cnt = np.zeros((n, e_width), np.float32)
        out_cnt[ent_rows, ent_cols] = e_count
        return EvidenceBatch(torch.from_numpy(out_items), torch.from_numpy(out_feats),
                             torch.from_numpy(out_ent), torch.from_numpy(out_cnt))


def _segments(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranges [lo_b, hi_b) as one flat array of positions, with each position's b."""
    lengths = np.maximum(np.asarray(hi, np.int64) - np.asarray(lo, np.int64), 0)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return owner, np.repeat(np.asarray(lo, np.int64) - starts, lengths) + np.arange(int(lengths.sum()))


def _places(group_sample: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Row and column of every group in a (n, width) padded layout; groups sorted by sample."""
    per_sample = np.bincount(group_sample, minlength=n)
    starts = np.cumsum(per_sample) - per_sample
    cols = np.arange(len(group_sample)) - starts[group_sample]
    return group_sample, cols, max(1, int(per_sample.max(initial=0)))


@dataclass
class ItemAttributes:
    """The catalog's attributes from the dataset's entity KG: for every relation whose heads are
    items (starring, director, genre, ...), which attribute entities each item has.

    relations: the relation names; item_rows / entity_cols / relation_ids: one entry per
    (item, attribute, relation) edge, item as catalog index; n_entity: the entity id space."""

    relations: list[str]
    item_rows: np.ndarray
    entity_cols: np.ndarray
    relation_ids: np.ndarray
    n_items: int
    n_entity: int

    @classmethod
    def from_triples(cls, triples: Sequence[Sequence], item_entity_ids: Sequence[int], n_entity: int,
                     max_relations: int = 16) -> "ItemAttributes":
        """From (head id, relation name, tail id) triples; the ``max_relations`` relations with the
        most item edges are kept (each gets a learned weight)."""
        position = {int(e): k for k, e in enumerate(item_entity_ids)}
        kept: dict[str, list[tuple[int, int]]] = {}
        for head, rel, tail in triples:
            k = position.get(int(head))
            if k is None or int(tail) in position or rel == SELF_LOOP:
                continue
            kept.setdefault(str(rel), []).append((k, int(tail)))
        relations = sorted(kept, key=lambda r: (-len(kept[r]), r))[:max_relations]
        rows, cols, rels = [], [], []
        for r, name in enumerate(relations):
            pairs = np.unique(np.asarray(kept[name], dtype=np.int64), axis=0)
            rows.append(pairs[:, 0])
            cols.append(pairs[:, 1])
            rels.append(np.full(len(pairs), r, np.int64))
        cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return cls(relations, cat(rows), cat(cols), cat(rels), len(item_entity_ids), int(n_entity))

    @classmethod
    def from_side_data(cls, side_data: Mapping[str, Any] | None, item_entity_ids: Sequence[int],
                       n_entity: int) -> "ItemAttributes":
        """From CRSLab's ``side_data['entity_kg']`` (``edge`` rows (head, tail, relation id); the
        names from its ``relation2id``, else ``relation_<id>``)."""
        kg = (side_data or {}).get("entity_kg") or {}
        names = {int(i): str(r) for r, i in (kg.get("relation2id") or {}).items()}
        triples = [(h, names.get(int(r), f"relation_{int(r)}"), t) for h, t, r in kg.get("edge", ())]
        return cls.from_triples(triples, item_entity_ids, n_entity)

    @classmethod
    def from_folder(cls, folder: str | Path, item_entity_ids: Sequence[int]) -> "ItemAttributes":
        """From a processed dataset folder's entity_kg.json and entity2id.json."""
        folder = Path(folder)
        try:
            triples = json.loads((folder / "entity_kg.json").read_text(encoding="utf-8"))
            n_entity = len(json.loads((folder / "entity2id.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: cannot read the entity KG for the evidence term ({e}); re-import the "
                            f"dataset or set evidence.attributes: false") from None
        n_entity = max(n_entity, int(max((max(int(h), int(t)) for h, _, t in triples), default=0)) + 1)
        return cls.from_triples(triples, item_entity_ids, n_entity)

    def idf(self) -> np.ndarray:
        """(n_entity,) log(N / items having the entity), 0 for entities no item has: a genre shared
        by half the catalog says less than a director."""
        df = np.bincount(self.entity_cols, minlength=self.n_entity).astype(np.float64)
        out = np.zeros(self.n_entity, np.float32)
        has = df > 0
        out[has] = np.log(self.n_items / df[has]).astype(np.float32)
        return out


__all__ = ["EvidenceBatch", "EvidenceBuilder", "ITEM_FEATURES", "ItemAttributes"]
