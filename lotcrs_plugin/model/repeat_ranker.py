"""RepeatPopularity: a training-free baseline recommender for CRSLab (``rec_model: RepeatPopularity``).

The items already mentioned in the conversation come first, the most recently mentioned
first; every other item follows by training popularity. Popularity is
side_data['item_stats'][item]['train_mentions'] when the dataset gives it (the plugin's
datasets do), else the targets of the training batches are counted as CRSLab's Popularity
model does (any epoch count gives the same order).

It runs in CRSLab's TGReDialSystem with TGReDialDataLoader, as CRSLab's Popularity model does:
the batch is the TG-ReDial rec batch (context, mask, item history, ..., target) and the output
is a score over CRSLab's entity space [B, n_entity], of which the system keeps the catalog
columns. It has no trainable parameter: the system builds its optimizer over empty parameter
groups (torch accepts that, as for CRSLab's Popularity) and the loss is a zero tensor that
requires grad, so ``backward`` and the optimizer step change nothing. The counts are a buffer,
so they move with ``.to(device)`` and are saved with the system.

The item history is left-padded with the vocabulary's pad id; entries that are the pad id or
not a catalog item are ignored (so with a tokenizer whose pad id is a catalog item's entity id,
that item's mentions are not seen: the plugin's datasets number entities from 1 and nltk/BERT
pad with 0).
"""

from __future__ import annotations

from typing import Any

import torch

from lotcrs_plugin import compat

compat.apply()  # before any crslab import

from crslab.data.dataloader.tgredial import TGReDialDataLoader  # noqa: E402
from crslab.model.base import BaseModel  # noqa: E402
from crslab.system.tgredial import TGReDialSystem  # noqa: E402

from lotcrs_plugin.errors import UserError  # noqa: E402

NAME = "RepeatPopularity"
# CRSLab looks up the dataloader and the system by model_name: the same as for Popularity.
RepeatPopularityDataLoader = TGReDialDataLoader
RepeatPopularitySystem = TGReDialSystem

_HISTORY = 2  # position of the item history in CRSLab's TG-ReDial rec batch
_TARGET = -1


class RepeatPopularityModel(BaseModel):
    """Mentioned items first (most recent first), then the rest by training popularity."""

    def __init__(self, opt: dict, device: torch.device, vocab: dict, side_data: dict):
        self.n_entity = int(vocab["n_entity"])
        self.pad = int(vocab.get("pad", 0))
        items = side_data.get("item_entity_ids") if isinstance(side_data, dict) else None
        if not items:
            raise UserError(f"{NAME}: dataset '{opt.get('dataset')}' gives no item list "
                            f"(side_data['item_entity_ids']); RepeatPopularity needs a recommender dataset")
        self.item_ids = [int(i) for i in items]
        self.item_stats = side_data.get("item_stats")
        super().__init__(opt, device)

    def build_model(self, *args: Any, **kwargs: Any) -> None:
        items = torch.tensor(self.item_ids, dtype=torch.long)
        if int(items.min()) < 0 or int(items.max()) >= self.n_entity:
            raise UserError(f"{NAME}: item entity ids must lie in [0, {self.n_entity}), "
                            f"got {int(items.min())}..{int(items.max())}")
        is_item = torch.zeros(self.n_entity, dtype=torch.bool)
        is_item[items] = True
        if 0 <= self.pad < self.n_entity:
            is_item[self.pad] = False
        counts = torch.zeros(self.n_entity, dtype=torch.float64)
        self.from_stats = bool(self.item_stats)
        if self.from_stats:
            counts[items] = torch.tensor([float(_train_mentions(self.item_stats, i)) for i in self.item_ids],
                                         dtype=torch.float64)
        self.register_buffer("items", items)
        self.register_buffer("is_item", is_item)
        self.register_buffer("counts", counts)

    def popularity_score(self) -> torch.Tensor:
        """[n_entity]: catalog items scored n_items (most popular) down to 1, ties by catalog
        order; other entities -1. Recomputed per call (a sort of the catalog) so that it always
        follows the counts, also after load_state_dict."""
        n = self.items.shape[0]
        order = torch.sort(-self.counts[self.items], stable=True).indices
        score = torch.full((self.n_entity,), -1.0, device=self.counts.device)
        score[self.items[order]] = torch.arange(n, 0, -1, device=self.counts.device, dtype=score.dtype)
        return score

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """[B, n_entity] scores from the item history [B, L] (left-padded, oldest first)."""
        b, length = history.shape
        history = history.long().clamp(0, self.n_entity - 1)
        valid = self.is_item[history]
        # recency 1..L for a mention (later column = more recent), 0 for padding
        recency = torch.arange(1, length + 1, device=history.device, dtype=torch.float32).expand(b, length)
        recency = recency * valid
        last = torch.zeros(b, self.n_entity, device=history.device)
        last.scatter_reduce_(1, history, recency, reduce="amax", include_self=True)
        n_items = float(self.items.shape[0])
        base = self.popularity_score().unsqueeze(0).expand(b, -1)
        return torch.where(last > 0, n_items + last, base)

    def forward(self, batch: Any, mode: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """CRSLab's rec interface: (loss, scores) in train/val/test, scores in infer."""
        history = batch[_HISTORY]
        if mode == "train" and not self.from_stats:
            target = batch[_TARGET].long()
            self.counts.index_add_(0, target, torch.ones_like(target, dtype=self.counts.dtype))
        scores = self.scores(history)
        if mode == "infer":
            return scores
        # no parameter to train: a zero leaf that accepts backward()
        loss = torch.zeros(1, device=history.device, requires_grad=True)
        return loss, scores


def _train_mentions(stats: Any, item: int) -> int:
    entry = stats.get(item, stats.get(str(item)))
    if not isinstance(entry, dict) or "train_mentions" not in entry:
        raise UserError(f"{NAME}: side_data['item_stats'] has no train_mentions for item {item}; "
                        f"every catalog item needs one")
    return int(entry["train_mentions"])
