"""Fusion of retrieved memory values into a backbone's token states, and the retrieval loss
(LOT-CRS step 3), on tensors so that any backbone can use them.

The backbone gives token states h [B, T, H]; the memory store gives k values [B, k, H] per
sample (hidden states at the [MASK] of simulated contexts). :class:`RetrievalFusion` lets every
token attend to the k values (one head) and returns LayerNorm(h + w * attention) for every
token; the model then reads its [MASK] position and applies its verbaliser (item logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.retrieval import MemoryStore


class RetrievalFusion(nn.Module):
    """Single-head attention from token states to retrieved values, then LayerNorm(h + w * attn).

    Queries are the projected token states; keys are the projected retrieved values; the
    attended vectors are the retrieved values themselves, unprojected: they are hidden states
    at a [MASK] of the same backbone, already in the space its MLM head / verbaliser reads.
    The projections start as the identity, so the initial attention is plain
    softmax(h . v / sqrt(H)).

    Args:
        hidden_size: H of the token states and of the values.
        weight: w, the share of the attention output added to h (0 gives LayerNorm(h)).
        dropout: on the attention output before it is added.
        layer_norm_eps: of the LayerNorm.
    """

    def __init__(self, hidden_size: int, weight: float = 1.0, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = float(weight)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        for proj in (self.query, self.key):
            nn.init.eye_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def attend(self, hidden: torch.Tensor, values: torch.Tensor,
               value_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output [B, T, H] and weights [B, T, k]; a sample with no valid value
        gets a zero output (not NaN)."""
        if values.shape[0] != hidden.shape[0] or values.shape[-1] != hidden.shape[-1]:
            raise ValueError(f"fusion: values {list(values.shape)} do not match hidden states {list(hidden.shape)}")
        values = values.to(hidden.dtype)
        scores = self.query(hidden) @ self.key(values).transpose(1, 2) / math.sqrt(self.hidden_size)
        if value_mask is not None:
            scores = scores.masked_fill(~value_mask.bool()[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # all values masked: softmax of -inf row
        return weights @ values, weights

    def forward(self, hidden: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused token states [B, T, H].

        hidden [B, T, H]: token states; values [B, k, H]: retrieved values; token_mask [B, T]:
        1 for real tokens (padding positions are returned unchanged, never read); value_mask
        [B, k]: 1 for filled retrieval slots (``RetrievalResult.mask``).
        """
        attended, _ = self.attend(hidden, values, value_mask)
        fused = self.layer_norm(hidden + self.weight * self.dropout(attended))
        if token_mask is not None:
            fused = torch.where(token_mask.bool().unsqueeze(-1), fused, hidden)
        return fused


def retrieval_contrastive_loss(query: torch.Tensor, store: MemoryStore, target_items: torch.Tensor,
                               n_pos: int = 4, n_neg: int = 512, temperature: float = 0.05, *,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """InfoNCE of the query encoder against the store's fixed keys (the authors' retrieval loss).

    For each query [B, Hk] with target item t: up to ``n_pos`` keys of t (positives) and
    ``n_neg`` keys drawn uniformly from the store (those of t are masked out). Each positive is
    scored against the negatives: -log softmax([s_pos, s_neg...] / temperature)[0], averaged
    over the positives and the queries that have any (an item absent from the store adds
    nothing). Queries are L2-normalised when the store is (cosine). Keys get no gradient.
    """
    if query.ndim != 2 or query.shape[1] != store.key_dim:
        raise UserError(f"retrieval loss: queries must be [B, {store.key_dim}] (the key size), got {list(query.shape)}")
    if len(store) == 0:
        raise UserError("retrieval loss: the memory store is empty; build it from at least one entry")
    device = query.device
    keys = store.tensor("keys", device)
    items = store.tensor("items", device)
    q = F.normalize(query, dim=-1) if store.config.normalize else query
    q = q.to(keys.dtype)
    pos, pos_ok = store.entries_of_items(target_items, n_pos, generator=generator)
    neg = torch.randint(len(store), (query.shape[0], n_neg), generator=generator).to(device)
    target = target_items.to(device).long()
    neg_ok = items[neg] != target[:, None]
    s_pos = torch.einsum("bh,bph->bp", q, keys[pos]) / temperature
    s_neg = (torch.einsum("bh,bnh->bn", q, keys[neg]) / temperature).masked_fill(~neg_ok, float("-inf"))
    # [B, P, 1 + N]: each positive against all negatives of its query
    logits = torch.cat([s_pos.unsqueeze(-1), s_neg.unsqueeze(1).expand(-1, s_pos.shape[1], -1)], dim=-1)
    per_pos = torch.logsumexp(logits, dim=-1) - s_pos
    weights = pos_ok.to(per_pos.dtype)
    rows = weights.sum(-1)
    has_pos = rows > 0
    if not bool(has_pos.any()):
        return query.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    per_query = (per_pos * weights).sum(-1)[has_pos] / rows[has_pos]
    return per_query.mean()
