"""The two pre-training objectives of LOT-CRS, on tensors.

- Domain-adaptive masked prediction (DMP): only keyword tokens (item tokens and the tokens of
  attribute names) are masked. A keyword SPAN is selected as a whole with probability
  ``probability`` (0.9 in the authors' code), so a multi-token name never leaks through its own
  unmasked half; each selected token then becomes the mask token (80%), a random vocabulary
  token (10%) or stays (10%). Cross-entropy over the whole vocabulary, item tokens included, at
  the selected positions only (their logits alone are computed).
- Contrastive context alignment (CCA): two different contexts that lead to the same item are a
  positive pair; InfoNCE over in-batch negatives with cosine similarity / temperature (SimCSE).
  Other pairs of the batch with the same target are not negatives (they are masked out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the rest keep their token


@dataclass
class MaskedInputs:
    input_ids: torch.Tensor  # (B, T) the corrupted ids
    labels: torch.Tensor     # (B, T) the original id where selected, IGNORE elsewhere
    selected: torch.Tensor   # (B, T) bool


def mask_keywords(input_ids: torch.Tensor, keyword_mask: torch.Tensor, span_start: torch.Tensor | None = None, *,
                  probability: float, mask_token_id: int, vocab_size: int,
                  generator: torch.Generator | None = None) -> MaskedInputs:
    """Select keyword spans with ``probability`` and corrupt them 80/10/10 (vectorised).

    ``keyword_mask``: (B, T) bool; ``span_start``: (B, T) bool, the first token of each keyword
    span (e.g. ``entity_ids > 0``); without it every keyword token is its own span. Non-keyword
    positions are never selected.
    """
    device = input_ids.device
    kw = keyword_mask.bool().reshape(-1)
    starts = kw if span_start is None else (span_start.bool().reshape(-1) & kw)
    # a keyword token with no keyword before it in its row starts a span even without a mark
    # (e.g. a span whose first token was cut off by truncation)
    prev = torch.roll(kw, 1)
    prev[:: input_ids.shape[1]] = False
    starts = starts | (kw & ~prev)
    span_id = torch.cumsum(starts.long(), 0) - 1  # every token of a span shares its start's id
    draw = torch.rand(kw.numel(), device=device, generator=generator)  # one draw per span (ids < numel)
    chosen = draw[span_id.clamp_min(0)] < probability
    selected = (kw & chosen).reshape(input_ids.shape)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    how = torch.rand(input_ids.shape, device=device, generator=generator)
    to_mask = selected & (how < MASK_SHARE)
    to_random = selected & (how >= MASK_SHARE) & (how < MASK_SHARE + RANDOM_SHARE)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return MaskedInputs(corrupted, labels, selected)


def masked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) over the selected positions; ``lm_logits`` maps (N, H)
    states to (N, V). With nothing selected the loss is a zero that keeps the graph."""
    where = labels != IGNORE
    if not bool(where.any()):
        zero = hidden.sum() * 0.0
        return zero, zero.detach()
    logits = lm_logits(hidden[where]).float()
    target = labels[where]
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, acc.detach()


class ProjectionHead(nn.Module):
    """SimCSE's MLP on the [CLS] vector, used while training only: Linear + Tanh."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.05,
             targets: torch.Tensor | None = None, similarity: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE loss, in-batch accuracy) of B anchor/positive pairs: row i's positive is column i,
    every other column a negative, except columns whose pair has the same ``targets`` value.

    similarity: 'cosine' (SimCSE) or 'dot'.
    """
    a, p = anchors.float(), positives.float()
    if similarity == "cosine":
        a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be cosine or dot, not {similarity!r}")
    logits = a @ p.t() / temperature
    labels = torch.arange(len(a), device=a.device)
    if targets is not None:
        same = targets[:, None] == targets[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc.detach()
