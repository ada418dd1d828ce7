"""Tail slots: places of the ranked lists reserved for the tail items the balanced store votes for.

After fine-tuning on real conversations the model's lists are head items; the kNN vote of the
balanced simulated store (lotcrs_plugin.model.knn) ranks tail items by the context instead. Adding
the vote to the scores (``knn_weight``) trades head accuracy for the tail all along the list. Tail
slots keep the model's order in most places and hand a few fixed ones to the tail: with
``{10: 2, 50: 20}`` the top 10 are the model's 8 best items then the 2 tail items the vote ranks
best, and places 11-50 the model's next 20 then 20 more tail items. It is the quota form of
popularity-aware re-ranking (e.g. Abdollahpouri et al., 2019), with the simulated store as the
tail ranker, beyond the paper; ``tail_slots: auto`` picks the counts on validation under a
metric they may not lower (``tail_slots_keep``, e.g. recall@10).

The model's items keep their places (the first ``n_model`` of its list); a tail candidate the model
already lists is skipped. Tail ranking: log(1 + N p_knn) + ``tail_logit_weight`` x logit over
the tail items only (the others get a large negative score), so the items the vote does not
reach follow in the model's order.
"""

from __future__ import annotations

from itertools import product
from typing import Mapping

import torch

NOT_TAIL = -1.0e4  # added to the scores of head items in the tail ranking (scores stay finite)


def slot_mask(slots: Mapping[int, int], depth: int) -> torch.Tensor:
    """(depth,) bool: True at the places reserved for tail items (the last ``slots[c]`` places
    before each cut-off c)."""
    mask = torch.zeros(depth, dtype=torch.bool)
    for cut, n in slots.items():
        if n:
            mask[max(0, min(cut, depth) - n):min(cut, depth)] = True
    return mask


def merge_tail_slots(model_top: torch.Tensor, tail_top: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, depth) lists: the model's first items at the places ``mask`` leaves, the best tail
    candidates the model's kept items do not hold at the reserved ones.

    model_top (B, >= depth) and tail_top (B, m) are rankings (item ids, best first); m should be
    at least the number of slots plus the model's kept items, so that enough candidates remain
    after the duplicates are skipped (the model's further items fill any shortfall)."""
    depth = mask.shape[0]
    mask = mask.to(model_top.device)
    n_model = int((~mask).sum())
    kept = model_top[:, :n_model]
    # candidates: the tail ranking, then the model's next items (a tiny catalog's fallback)
    cand = torch.cat([tail_top, model_top[:, n_model:]], 1)
    dup = (cand[:, :, None] == kept[:, None, :]).any(-1) | (cand < 0)
    earlier = (cand[:, :, None] == cand[:, None, :]).tril(diagonal=-1).any(-1)  # listed before in cand
    order = torch.argsort((dup | earlier).to(torch.int8), dim=1, stable=True)
    fresh = cand.gather(1, order)[:, :depth - n_model]
    out = torch.empty((model_top.shape[0], depth), dtype=model_top.dtype, device=model_top.device)
    out[:, ~mask] = kept
    out[:, mask] = fresh
    return out


def grid_settings(grid: Mapping[int, tuple[int, ...]]) -> list[dict[int, int]]:
    """Every combination of the grid's slot counts, fewest slots first."""
    cuts = list(grid)
    combos = [dict(zip(cuts, counts)) for counts in product(*(grid[c] for c in cuts))]
    return sorted(combos, key=lambda s: (sum(s.values()), tuple(s.values())))


def describe(slots: Mapping[int, int] | None) -> str:
    if not slots or not any(slots.values()):
        return "none"
    return ", ".join(f"{n} in the top {c}" for c, n in slots.items() if n)


__all__ = ["NOT_TAIL", "describe", "grid_settings", "merge_tail_slots", "slot_mask"]
