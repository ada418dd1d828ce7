"""The item catalog as the long-tail metrics see it: entity ids, popularity and the tail mask.

Popularity comes from item_stats (``{"<entity id>": {"name", "train_mentions",
"train_rec_mentions", "source_mentions"}}``, see docs/DATA_LAYOUT.md): from a given file, else the system's
side_data, else the dataset folder's item_stats.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator.config import LongTailConfig


@dataclass(frozen=True, eq=False)
class Catalog:
    """The items in the system's order (position p is item_ids[p]) with popularity and tail."""

    item_ids: np.ndarray  # (n,) int64 entity ids
    counts: np.ndarray  # (n,) int64 popularity (mention counts)
    is_tail: np.ndarray  # (n,) bool
    definition: str
    count_field: str
    source: str  # where the popularity came from

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def n_tail(self) -> int:
        return int(self.is_tail.sum())

    def positions_of(self, entity_ids: np.ndarray) -> np.ndarray:
        """Catalog positions of entity ids (any shape); -1 where an id is not a catalog item."""
        ids = np.asarray(entity_ids, dtype=np.int64)
        lookup = self._lookup()
        inside = (ids >= 0) & (ids < lookup.shape[0])
        return np.where(inside, lookup[np.clip(ids, 0, lookup.shape[0] - 1)], -1)

    def _lookup(self) -> np.ndarray:
        cached = self.__dict__.get("_lookup_table")
        if cached is None:
            cached = np.full(int(self.item_ids.max(initial=-1)) + 1, -1, dtype=np.int64)
            cached[self.item_ids] = np.arange(self.n_items, dtype=np.int64)
            object.__setattr__(self, "_lookup_table", cached)
        return cached

    def metadata(self) -> dict[str, Any]:
        """What every report states about the catalog and the tail."""
        tail_counts = self.counts[self.is_tail]
        return {
            "definition": self.definition,
            "count_field": self.count_field,
            "catalog_size": self.n_items,
            "tail_size": self.n_tail,
            "tail_max_count": int(tail_counts.max()) if tail_counts.size else None,
            "popularity_source": self.source,
        }

    @classmethod
    def build(cls, item_ids: Sequence[int], item_stats: Mapping[Any, Mapping[str, Any]],
              config: LongTailConfig, source: str) -> "Catalog":
        """The catalog of ``item_ids`` with the popularity of ``item_stats`` and the tail of ``config``."""
        ids = np.asarray(list(item_ids), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise UserError("longtail: the system's item list (side_data['item_entity_ids']) is empty")
        if int(ids.min()) < 0:
            raise UserError("longtail: the system's item list (side_data['item_entity_ids']) has a negative entity id")
        if np.unique(ids).size != ids.size:
            raise UserError("longtail: the system's item list (side_data['item_entity_ids']) repeats an entity id")
        counts = np.empty(ids.size, dtype=np.int64)
        for p, entity in enumerate(ids.tolist()):  # once per run, not in the metric path
            stats = item_stats.get(str(entity), item_stats.get(entity))
            if stats is None:
                raise UserError(f"longtail: {source} has no entry for item entity id {entity}; "
                                f"item_stats must cover every item of the catalog")
            value = stats.get(config.count)
            if value is None:
                hint = (" (datasets imported before it was counted: run `crslab import-data` again "
                        "with --force)" if config.count == "train_rec_mentions" else "")
                raise UserError(f"longtail: {source} gives no {config.count} for item entity id {entity}{hint}; "
                                f"use `count: train_mentions` or complete the file")
            counts[p] = int(value)
        is_tail = tail_mask(counts, config)
        return cls(ids, counts, is_tail, config.definition(), config.count, source)


def tail_mask(counts: np.ndarray, config: LongTailConfig) -> np.ndarray:
    """Which catalog positions are tail items under ``config`` (vectorised)."""
    counts = np.asarray(counts)
    if config.tail == "mentions":
        return counts <= config.threshold
    n_tail = math.floor(config.fraction * counts.size + 1e-9)
    # least popular first; a stable order so that ties at the border go by catalog position
    order = np.lexsort((np.arange(counts.size), counts))
    mask = np.zeros(counts.size, dtype=bool)
    mask[order[:n_tail]] = True
    return mask


def load_item_stats(path: str | Path) -> dict[str, Any]:
    """An item_stats.json as a dict, or UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"longtail: item_stats file '{p}' not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{p}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: item_stats must be a JSON object of entity id -> stats")
    return data


def find_in_side_data(side_data: Any, key: str) -> Any:
    """side_data[key] for single-model systems, side_data['rec'][key] (then other tasks) else."""
    if not isinstance(side_data, Mapping):
        return None
    if key in side_data:
        return side_data[key]
    tasks = ["rec"] + [t for t in side_data if t != "rec"]
    for task in tasks:
        sub = side_data.get(task)
        if isinstance(sub, Mapping) and key in sub:
            return sub[key]
    return None
