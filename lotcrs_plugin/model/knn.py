"""kNN vote of the balanced memory: the simulated contexts nearest to a real one vote for their items.

The verbaliser learns its item scores from real conversations, where a tail item is the answer a
handful of times at most: after fine-tuning it ranks the head first whatever the context says.
The simulated data holds every item equally often, each behind contexts that name its
attributes. Here a frozen copy of the backbone as it was before fine-tuning (the pre-trained one)
embeds contexts (``knn_pooling``, cosine); the ``knn_k`` simulated contexts nearest to a real
context vote for their items with weights softmax(similarity / ``knn_temperature``), giving a
sparse distribution p_knn over at most ``knn_k`` items; it enters the item scores as

    score_i = logit_i + knn_weight * log(1 + N * p_knn_i)

i.e. a product of experts p ~ p_model * (1/N + p_knn) ** knn_weight (the kNN distribution
smoothed by the uniform one, so items outside the neighbourhood keep their order). It is
kNN-LM's idea (Khandelwal et al., 2020) applied to LOT-CRS's balanced store, an addition of this
toolkit beyond the paper's fusion; ``knn_weight: 0`` is the paper, ``auto`` picks the weight on
the validation split from ``knn_grid``.

Only evaluation uses the vote (training is unchanged); it costs one forward pass of the frozen
encoder and one faiss search per batch. The bonus is sparse ([B, m] item ids and values), so
ranking stays chunked (the ``bonus`` of :func:`lotcrs_plugin.evaluator.ranking.rank_linear`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.retrieval import MemoryStore

MANIFEST = "knn.json"


def aggregate_votes(items: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the weights of repeated items per row: items/weights (B, k), item -1 = no entry.

    Returns (ids (B, k), votes (B, k)): each row's distinct items first (ascending), then -1 with
    vote 0. Vectorised: one global unique over (row, item) keys."""
    b, k = items.shape
    device = items.device
    valid = items >= 0
    span = int(items.max().item()) + 2 if items.numel() else 1
    rows = torch.arange(b, device=device)[:, None].expand(b, k)
    key = torch.where(valid, rows * span + items, torch.full_like(items, -1))
    uniq, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    sums = torch.zeros(uniq.shape[0], dtype=weights.dtype, device=device)
    sums.index_add_(0, inverse, torch.where(valid, weights, torch.zeros_like(weights)).reshape(-1))
    keep = uniq >= 0
    uniq, sums = uniq[keep], sums[keep]
    u_row, u_item = uniq // span, uniq % span
    # position within the row: uniq is sorted, so rows are contiguous
    counts = torch.bincount(u_row, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(uniq.shape[0], device=device) - starts[u_row]
    ids = torch.full((b, k), -1, dtype=torch.long, device=device)
    votes = torch.zeros((b, k), dtype=weights.dtype, device=device)
    ids[u_row, pos] = u_item
    votes[u_row, pos] = sums
    return ids, votes


def knn_bonus(votes: torch.Tensor, n_items: int, weight: float) -> torch.Tensor:
    """weight * log(1 + N * p_knn): 0 where there is no vote."""
    return weight * torch.log1p(n_items * votes.clamp_min(0))


def context_keys(encoder: Any, batch: Any, pooling: str) -> torch.Tensor:
    """(B, H) unit context vectors of the encoder: the store's keys and the queries."""
    return F.normalize(encoder.context_representation(batch, pooling).float(), dim=-1)


class KnnVoter:
    """The frozen encoder and the store of simulated context keys (values unused)."""

    def __init__(self, encoder: Any, store: MemoryStore, n_items: int, *, k: int, temperature: float,
                 pooling: str, weight: float = 0.0, source: str = "", tail_slots: dict[int, int] | None = None):
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.store = store
        self.n_items = int(n_items)
        self.k = min(int(k), len(store))
        self.temperature = float(temperature)
        self.pooling = pooling
        self.weight = float(weight)
        self.source = source  # where the encoder is rebuilt from (a pre-trained export or backbone_path)
        # places of the lists reserved for the tail items the vote ranks best (model/tail_slots.py)
        self.tail_slots = {int(c): int(n) for c, n in tail_slots.items()} if tail_slots else None

    @torch.no_grad()
    def keys(self, batch: Any) -> torch.Tensor:
        return context_keys(self.encoder, batch, self.pooling)

    @torch.no_grad()
    def votes(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, p_knn) of a batch: (B, k) distinct items per row (-1 = none) and their vote."""
        found = self.store.search(self.keys(batch), self.k)
        scores = found.scores.float()
        w = torch.softmax(torch.where(torch.isfinite(scores), scores / self.temperature,
                                      torch.full_like(scores, -math.inf)), dim=1)
        w = torch.nan_to_num(w, nan=0.0)
        return aggregate_votes(found.items.long(), w)

    def bonus(self, batch: Any, weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids, p = self.votes(batch)
        return ids, knn_bonus(p, self.n_items, self.weight if weight is None else weight)

    def to(self, device: Any) -> "KnnVoter":
        self.encoder.to(device)
        return self

    # -- files: the store and where the encoder comes from (it is not copied)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.store.save(folder)
        (folder / MANIFEST).write_text(json.dumps({
            "source": self.source, "k": self.k, "temperature": self.temperature, "pooling": self.pooling,
            "weight": self.weight, "n_items": self.n_items, "tail_slots": self.tail_slots}, indent=1),
            encoding="utf-8")
        return folder

    @staticmethod
    def read_manifest(folder: str | Path) -> dict[str, Any]:
        path = Path(folder) / MANIFEST
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: missing or unreadable kNN manifest ({exc}); run the training again") from exc


def knn_store(keys: np.ndarray, items: np.ndarray, cfg: RetrievalConfig, k: int) -> MemoryStore:
    """A cosine store of unit keys with no values (a [N, 1] zero column keeps the store's format),
    searched for ``k`` neighbours, with the index settings of ``cfg``."""
    from dataclasses import replace

    config = replace(cfg, normalize=True, top_k=min(k, len(keys)), max_per_item=None)  # rows chosen by the caller
    return MemoryStore.build(keys, np.zeros((len(keys), 1), np.float32), items, config)


__all__ = ["KnnVoter", "aggregate_votes", "context_keys", "knn_bonus", "knn_store"]
