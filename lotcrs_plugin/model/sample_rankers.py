"""Training-free rankers on the LOT-CRS samples: ``lotcrs.ranker: popularity | repeat_popularity``.

Baselines scored on exactly the samples, the catalog and the evaluator of a LOT-CRS run (the
same 'unmentioned' subset), which CRSLab's own Popularity (a different sample set: every
mentioned item of every turn) cannot give:

- popularity: items by their training-split mention count (``item_stats[...]['train_mentions']``);
- repeat_popularity: the items named in the context come first, the most recently named first,
  then the rest by popularity. A ranker with no training that exploits repeats: on the samples
  whose target was named before, it is hard to beat; on the 'unmentioned' subset it is the
  popularity ranker.

Item mentions are read from the formatted input (item tokens), so they cover the context within
``lotcrs.max_length`` tokens, as the model sees it. Ranking is chunked like the model's
(the ``bonus`` of :func:`lotcrs_plugin.evaluator.ranking.rank_linear`): popularity is a linear scorer with a
sparse bonus for the repeated items.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator.ranking import Ranking, rank_linear

RANKERS = ("model", "popularity", "repeat_popularity")


def train_popularity(entity_ids: Sequence[int], item_stats: Mapping[Any, Mapping[str, Any]] | None) -> torch.Tensor:
    """(N,) float: training mentions of each catalog item (0 where the dataset has no count)."""
    stats = item_stats or {}
    counts = []
    for eid in entity_ids:
        row = stats.get(eid) or stats.get(str(eid)) or {}
        counts.append(float(row.get("train_mentions") or 0))
    if not any(counts):
        raise UserError("lotcrs.ranker: the dataset has no training mention counts (item_stats.json "
                        "train_mentions); import it with `crslab import-data` or use ranker: model")
    return torch.tensor(counts, dtype=torch.float32)


def repeated_items(input_ids: torch.Tensor, attention_mask: torch.Tensor, first_item_id: int,
                   n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, last_pos) (B, T): each row's distinct items named in the input with the position of
    their last mention; -1 / 0 elsewhere (not packed)."""
    b, t = input_ids.shape
    items = input_ids.long() - first_item_id
    is_item = (items >= 0) & (items < n_items) & attention_mask.bool()
    pos = torch.arange(t, device=input_ids.device).expand(b, t)
    big = n_items * t
    key = torch.where(is_item, items * t + pos, torch.full_like(items, big))
    key, _ = key.sort(dim=1)
    item_s, pos_s, valid = key // t, key % t, key < big
    nxt = torch.cat([item_s[:, 1:], torch.full_like(item_s[:, :1], -1)], 1)
    last = valid & (item_s != nxt)
    return torch.where(last, item_s, torch.full_like(item_s, -1)), torch.where(last, pos_s, torch.zeros_like(pos_s))


class SampleRanker:
    """Scores the catalog without a model (see the module docstring)."""

    def __init__(self, kind: str, popularity: torch.Tensor, first_item_id: int):
        if kind not in RANKERS[1:]:
            raise UserError(f"lotcrs.ranker: {kind!r} is not a training-free ranker; use one of "
                            f"{', '.join(RANKERS)}")
        self.kind = kind
        # log counts: the order is the counts' order, and the repeat bonus below dominates them
        self.popularity = torch.log1p(popularity)
        self.first_item_id = int(first_item_id)

    def rank(self, batch: Any, targets: torch.Tensor | None, k: int, max_elements: int) -> Ranking:
        device = batch.input_ids.device
        pop = self.popularity.to(device)
        n, b = pop.shape[0], batch.input_ids.shape[0]
        query = torch.ones(b, 1, device=device)
        if self.kind == "repeat_popularity":
            ids, last = repeated_items(batch.input_ids, batch.attention_mask, self.first_item_id, n)
            # above every popularity score; later mentions higher
            bonus = torch.where(ids >= 0, float(pop.max()) + 1.0 + last.float(), torch.zeros_like(last, dtype=torch.float32))
        else:
            ids = torch.full((b, 1), -1, dtype=torch.long, device=device)
            bonus = torch.zeros(b, 1, device=device)
        return rank_linear(query, pop[:, None], None, k, targets=targets, max_elements=max_elements,
                           bonus=(ids, bonus))


__all__ = ["RANKERS", "SampleRanker", "repeated_items", "train_popularity"]
