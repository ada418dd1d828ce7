"""Full ranking over a large catalog in bounded memory: top-K items and each target's exact rank.

Scoring B samples against N items densely makes a (B, N) matrix: 64 x 100k floats are 25 MB,
and the temporaries of top-k / softmax / comparisons several times that. Here items are scored
in column chunks (and, if B alone exceeds the bound, in row blocks) so that no score block holds
more than ``max_elements`` values; a running top-K is merged chunk by chunk, the log-sum-exp
(for the cross-entropy) is accumulated, and each target's rank is the count of items scoring
above it.

Order: scores descending, ties broken by the lower item index (a stable sort of the scores). A
dense ``torch.sort(scores, descending=True, stable=True)`` gives the same lists and ranks; on
scores without ties that is also ``torch.topk``'s order (the evaluator only sees the lists).
Scores are assumed finite. A target inside the top K has its list position as rank; beyond, the
rank counts the items above the target's score computed as one dot product (:func:`rank_linear`),
which can differ from its entry in a block by float rounding, so an item within that rounding
can move the rank by one (3 of 512 targets over 100k items, benchmarks/results/scale.md).

Only torch is imported: the module is light (lotcrs_plugin.evaluator loads its parts lazily).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_MAX_ELEMENTS = 1 << 24  # 16.8M float32 values = 64 MiB per score block

# (row start, row stop, item start, item stop) -> the (rows, items) float scores of that block
ScoreFn = Callable[[int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class Ranking:
    """The ranking of B samples over N items.

    top_ids (B, K) int64 item indices, best first; top_scores (B, K) float32 their scores;
    target_rank (B,) int64 0-based position of the target in the full order (-1 where the
    target is negative: no target); target_score (B,) float32; logsumexp (B,) float32 of all
    N scores (cross-entropy = logsumexp - target_score).
    """

    top_ids: torch.Tensor
    top_scores: torch.Tensor
    target_rank: torch.Tensor | None
    target_score: torch.Tensor | None
    logsumexp: torch.Tensor

    def cross_entropy(self, reduction: str = "sum") -> torch.Tensor:
        """The cross-entropy of the targets (samples with a target only)."""
        if self.target_score is None:
            raise ValueError("cross_entropy needs targets")
        valid = self.target_rank >= 0
        ce = (self.logsumexp - self.target_score)[valid]
        return ce.sum() if reduction == "sum" else ce.mean()


def block_shape(n_rows: int, n_items: int, max_elements: int) -> tuple[int, int]:
    """(rows, items) of a score block: all rows when they fit one item column, as many items as
    the bound leaves."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be at least 1, not {max_elements}")
    rows = max(1, min(n_rows, max_elements))
    return rows, max(1, min(n_items, max_elements // rows))


def rank_chunked(score_fn: ScoreFn, n_rows: int, n_items: int, k: int, *,
                 targets: torch.Tensor | None = None, target_scores: torch.Tensor | None = None,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, device: torch.device | str | None = None,
                 on_block: Callable[[tuple[int, int]], None] | None = None) -> Ranking:
    """Rank ``n_items`` items for ``n_rows`` samples from scores computed block by block.

    ``score_fn(r0, r1, lo, hi)`` returns the (r1 - r0, hi - lo) scores of rows r0..r1-1 and items
    lo..hi-1; each call is at most ``max_elements`` values (see :func:`block_shape`).
    ``targets`` (B,) item indices (negative: none) with ``target_scores`` (B,) their scores, as
    ``score_fn`` computes them (for the rank count; the target's own entry never counts).
    ``on_block`` is called with each block's shape (instrumentation).
    """
    if n_items < 1:
        raise ValueError("rank_chunked: no items to rank")
    k = max(1, min(int(k), n_items))
    rb, cb = block_shape(n_rows, n_items, max_elements)
    has_t = targets is not None
    if has_t and target_scores is None:
        raise ValueError("rank_chunked: targets need their target_scores")
    out_ids, out_scores, out_rank, out_lse = [], [], [], []
    for r0 in range(0, n_rows, rb):
        r1 = min(n_rows, r0 + rb)
        top_v = top_i = None
        lse = None
        if has_t:
            t = targets[r0:r1].to(device=device, dtype=torch.long)
            ts = target_scores[r0:r1].to(device=device, dtype=torch.float32)
            count = torch.zeros(r1 - r0, dtype=torch.long, device=device)
        for lo in range(0, n_items, cb):
            hi = min(n_items, lo + cb)
            block = score_fn(r0, r1, lo, hi).float()
            if on_block is not None:
                on_block(tuple(block.shape))
            v, i = _chunk_top(block, k)
            # log-sum-exp through log_softmax (a vectorised kernel; torch.logsumexp is several times
            # slower on CPU), read at the row's maximum where it is most precise
            best = i[:, :1]
            part = v[:, 0] - torch.log_softmax(block, 1).gather(1, best).squeeze(1)
            lse = part if lse is None else torch.logaddexp(lse, part)
            i = i + lo
            if top_v is None:
                top_v, top_i = v, i
            else:  # the running list holds lower indices: a stable sort keeps them first on ties
                v, order = torch.sort(torch.cat([top_v, v], 1), dim=1, descending=True, stable=True)
                top_v = v[:, :k]
                top_i = torch.cat([top_i, i], 1).gather(1, order[:, :k])
            if has_t:
                count += _count_above(block, lo, t, ts)
            del block
        out_ids.append(top_i)
        out_scores.append(top_v)
        out_lse.append(lse)
        if has_t:
            # a target in the list has its list position (the list's scores are the ones compared)
            hit = top_i == t[:, None]
            pos = torch.where(hit.any(1), hit.float().argmax(1), torch.clamp(count, min=k))
            out_rank.append(torch.where(t >= 0, pos, torch.full_like(pos, -1)))
    return Ranking(torch.cat(out_ids), torch.cat(out_scores), torch.cat(out_rank) if has_t else None,
                   target_scores.float().to(device) if has_t else None, torch.cat(out_lse))


def _count_above(block: torch.Tensor, lo: int, t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """(rows,) items of the block (columns lo..) before the target in the order: scoring above
    ``ts``, or equal with a lower index; the target's own entry never counts. Two comparison
    passes (int32 sums: a bool sum would make an int64 copy of the block); the index test only
    for rows with an equal score (rare)."""
    above = (block > ts[:, None]).sum(1, dtype=torch.int32).long()
    equal = (block == ts[:, None]).sum(1, dtype=torch.int32)
    hi = lo + block.shape[1]
    inside = (t >= lo) & (t < hi)
    if bool(inside.any()):  # the target's own entry: never above it, nor a tie before it
        rows = inside.nonzero().squeeze(1)
        own = block[rows, t[rows] - lo]
        above[rows] -= (own > ts[rows]).long()
        equal[rows] -= (own == ts[rows]).int()
    tied = (equal > 0).nonzero().squeeze(1)
    if tied.numel():
        col = torch.arange(lo, hi, device=block.device)
        before = (block[tied] == ts[tied, None]) & (col[None, :] < t[tied, None])
        above[tied] += before.sum(1, dtype=torch.int32).long()
    return above


def _chunk_top(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (value, index) of each row of a block, ordered by value descending then index.

    torch.topk breaks ties arbitrarily: rows where ties straddle the k-th value (the k+1-th
    best equals the k-th) take a stable sort instead (rare on real scores), and the selection is
    ordered by (value, index)."""
    k = min(k, block.shape[1])
    v, i = torch.topk(block, min(k + 1, block.shape[1]), dim=1, sorted=True)
    if v.shape[1] > k:
        ambiguous = v[:, k] == v[:, k - 1]
    else:
        ambiguous = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    v, i = v[:, :k], i[:, :k]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        sv, si = torch.sort(block[rows], dim=1, descending=True, stable=True)
        v[rows], i[rows] = sv[:, :k], si[:, :k]
    # ties inside the selection: by index (sort by index, then a stable sort by value)
    i, order = torch.sort(i, dim=1)
    v = v.gather(1, order)
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    return v, i.gather(1, order)


Bonus = tuple[torch.Tensor, torch.Tensor]  # (ids, values), both (B, m): values[b, j] added to item ids[b, j]


class _SparseBonus:
    """A sparse term added to the scores: ``values[b, j]`` to item ``ids[b, j]`` (-1: none; ids
    distinct per row), e.g. the kNN vote (lotcrs_plugin.model.knn)."""

    def __init__(self, bonus: Bonus):
        self.ids = bonus[0]
        values = bonus[1].float()
        self.values = torch.where(self.ids >= 0, values, torch.zeros_like(values))

    def add(self, block: torch.Tensor, r0: int, r1: int, lo: int) -> torch.Tensor:
        """The (r1 - r0, items from lo) score block with the bonus of its rows and items added."""
        ids, values = self.ids[r0:r1], self.values[r0:r1]
        inside = (ids >= lo) & (ids < lo + block.shape[1])
        block = block.float()
        block.scatter_add_(1, torch.where(inside, ids - lo, torch.zeros_like(ids)),
                           torch.where(inside, values, torch.zeros_like(values)))
        return block

    def at(self, targets: torch.Tensor) -> torch.Tensor:
        """(B,) the bonus of each row's target."""
        return torch.where(self.ids == targets[:, None], self.values, torch.zeros_like(self.values)).sum(1)


def rank_linear(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *,
                targets: torch.Tensor | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
                on_block: Callable[[tuple[int, int]], None] | None = None,
                bonus: Bonus | None = None) -> Ranking:
    """Rank the items of a linear scorer: scores = query (B, H) @ weight (N, H).T + bias (N,),
    never more than ``max_elements`` scores at once (see :func:`rank_chunked`). Runs under the
    caller's autocast, as the dense ``F.linear`` would. ``bonus`` = (ids, values), both (B, m):
    a sparse term added to the scores, ``values[b, j]`` to item ``ids[b, j]`` (-1: none; ids
    distinct per row), e.g. the kNN vote (lotcrs_plugin.model.knn)."""
    if query.ndim != 2 or weight.ndim != 2 or query.shape[1] != weight.shape[1]:
        raise ValueError(f"rank_linear: query (B, H) and weight (N, H) expected, got {tuple(query.shape)} "
                         f"and {tuple(weight.shape)}")
    sparse = _SparseBonus(bonus) if bonus is not None else None

    def score(r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        block = F.linear(query[r0:r1], weight[lo:hi], None if bias is None else bias[lo:hi])
        return block if sparse is None else sparse.add(block, r0, r1, lo)

    target_scores = None
    if targets is not None:
        t = targets.to(query.device).long().clamp(min=0)
        # one dot product per row, through a batched matmul: the same kernel family (and autocast
        # dtype) as the blocks, so that the target's score matches its entry there
        target_scores = torch.bmm(query[:, None, :], weight[t][:, :, None]).reshape(-1)
        if bias is not None:
            target_scores = target_scores + bias[t].to(target_scores.dtype)
        if sparse is not None:
            target_scores = target_scores.float() + sparse.at(t)
    return rank_chunked(score, query.shape[0], weight.shape[0], k, targets=targets, target_scores=target_scores,
                        max_elements=max_elements, device=query.device, on_block=on_block)


def rank_dense(scores: torch.Tensor, k: int, *, targets: torch.Tensor | None = None,
               max_elements: int = DEFAULT_MAX_ELEMENTS, bonus: Bonus | None = None) -> Ranking:
    """The same ranking of an already computed (B, N) score matrix (temporaries stay bounded),
    with the sparse ``bonus`` of :func:`rank_linear` added block by block (``scores`` unchanged)."""
    sparse = _SparseBonus(bonus) if bonus is not None else None

    def score(r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        block = scores[r0:r1, lo:hi]
        return block if sparse is None else sparse.add(block.clone(), r0, r1, lo)

    target_scores = None
    if targets is not None:
        t = targets.to(scores.device).long()
        target_scores = scores.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        if sparse is not None:
            target_scores = target_scores.float() + sparse.at(t.clamp(min=0))
    return rank_chunked(score, scores.shape[0], scores.shape[1], k, targets=targets, target_scores=target_scores,
                        max_elements=max_elements, device=scores.device)


__all__ = ["DEFAULT_MAX_ELEMENTS", "Ranking", "block_shape", "rank_chunked", "rank_dense", "rank_linear"]
