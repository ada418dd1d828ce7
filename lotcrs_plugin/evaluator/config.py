"""The config block ``longtail:`` of the long-tail evaluator (``evaluator: longtail``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lotcrs_plugin.errors import UserError

TAIL_KINDS = ("mentions", "fraction")
COUNT_FIELDS = ("train_mentions", "train_rec_mentions", "source_mentions")
INDEX_SPACES = ("auto", "position", "entity")


@dataclass(frozen=True)
class LongTailConfig:
    """How the long-tail evaluator defines the tail, its cut-offs and its input index space.

    tail:        "mentions": an item is in the tail when its mention count is <= ``threshold``
                 (ReDial's convention: nbMentions <= 4); "fraction": the ``fraction`` least
                 popular items of the catalog (ties at the border broken by catalog order).
    threshold:   the mention count cut-off of ``tail: mentions``.
    fraction:    the share of the catalog that is tail for ``tail: fraction`` (0 < f <= 1).
    count:       the popularity of an item: ``train_mentions`` (mentions by either role in the
                 training split), ``train_rec_mentions`` (recommender turns of the training split
                 naming it, i.e. its fine-tuning samples: INSPIRED's published tail, at most one)
                 or ``source_mentions`` (the count a source file gives, ReDial's nbMentions).
                 It defines the tail and the average popularity of recommended items.
    ks:          the cut-offs k of every metric@k.
    index_space: what the ranks and labels given to ``rec_evaluate`` index: "position" (a
                 position in the system's item list, side_data['item_entity_ids'], as every
                 CRSLab system does), "entity" (an entity id), or "auto" (the system class's
                 ``rec_index_space`` attribute, else "position").
    item_stats:  a path to an item_stats.json to use instead of side_data['item_stats'] or the
                 dataset folder's item_stats.json.
    """

    tail: str = "mentions"
    threshold: int = 4
    fraction: float = 0.8
    count: str = "train_mentions"
    ks: tuple[int, ...] = (1, 10, 50)
    index_space: str = "auto"
    item_stats: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LongTailConfig":
        """Validate a ``longtail:`` block; UserError names an unknown key or a wrong value
        (the caller adds where the block is)."""
        d = dict(d or {})
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UserError(f"unknown key '{key}'; known keys: {', '.join(known)}")
        _choice(d, "tail", TAIL_KINDS)
        _choice(d, "count", COUNT_FIELDS)
        _choice(d, "index_space", INDEX_SPACES)
        if "threshold" in d:
            t = d["threshold"]
            if not _is_int(t) or t < 0:
                raise UserError(f"key 'threshold' must be an integer >= 0, not {t!r}")
        if "fraction" in d:
            f = d["fraction"]
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise UserError(f"key 'fraction' must be a number in (0, 1], not {f!r}")
            d["fraction"] = float(f)
        if "ks" in d:
            ks = d["ks"]
            if (not isinstance(ks, (list, tuple)) or not ks
                    or not all(_is_int(k) and k > 0 for k in ks)):
                raise UserError(f"key 'ks' must be a non-empty list of positive integers, not {ks!r}")
            d["ks"] = tuple(sorted(set(int(k) for k in ks)))
        if d.get("item_stats") is not None and not isinstance(d["item_stats"], str):
            raise UserError(f"key 'item_stats' must be a path string, not {d['item_stats']!r}")
        return cls(**d)

    def definition(self) -> str:
        """The tail definition in words, for every report."""
        if self.tail == "mentions":
            return f"{self.count} <= {self.threshold}"
        return (f"the {self.fraction:.0%} least popular items by {self.count} "
                f"(ties by catalog order)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(d: dict, key: str, choices: tuple[str, ...]) -> None:
    if key in d and d[key] not in choices:
        raise UserError(f"key '{key}' must be one of {', '.join(choices)}, not {d[key]!r}")
