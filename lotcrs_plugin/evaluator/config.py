"""The config block ``longtail:`` of the long-tail evaluator (``evaluator: longtail``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lotcrs_plugin.config_block import Check, integer, integer_list, number, one_of, string, typed_values

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
        return cls(**typed_values(cls, d, CHECKS))

    def definition(self) -> str:
        """The tail definition in words, for every report."""
        if self.tail == "mentions":
            return f"{self.count} <= {self.threshold}"
        return (f"the {self.fraction:.0%} least popular items by {self.count} "
                f"(ties by catalog order)")


_POSITIVE_INTS = integer_list("a non-empty list of positive integers", lambda k: k > 0)


def _ks(key: str, value: Any) -> tuple[int, ...]:
    return tuple(sorted(set(_POSITIVE_INTS(key, value))))


CHECKS: dict[str, Check] = {
    "tail": one_of(TAIL_KINDS),
    "count": one_of(COUNT_FIELDS),
    "index_space": one_of(INDEX_SPACES),
    "threshold": integer("an integer >= 0", lambda t: t >= 0),
    "fraction": number("a number in (0, 1]", lambda f: 0 < f <= 1),
    "ks": _ks,
    "item_stats": string("a path string", null=True),
}
