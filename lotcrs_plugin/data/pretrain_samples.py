"""LOT-CRS pre-training samples from tokenized dialogs, and their batches (dynamic padding).

Input: a :class:`~lotcrs_plugin.data.turns.TurnTable` (:func:`lotcrs_plugin.data.turns.tokenize_dialogs`)
of dialogs in the layout's format: the simulated data (every item the target of N conversations, the
target last) or any split of a processed dataset. Steps:

1. :func:`dmp_index` / :func:`cca_index`: which contexts are samples. DMP: dialog prefixes
   ending at each turn that holds a keyword (or whole dialogs). CCA: for each dialog, the turns
   before the first mention of its target (the last item mentioned) plus the prompt, the target
   replaced by the mask token wherever it occurs; contexts of the same target are positives.
2. :class:`PretrainData` + :class:`PretrainBatchSampler`: a batch is built whole in the
   DataLoader worker (slice, cut from the left, pad to the longest row rounded up to a multiple
   of 8); the order is a pure function of (seed, epoch), so a run resumes at any batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from lotcrs_plugin.data.length_buckets import bucketed_order
from lotcrs_plugin.data.turns import TurnTable
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.inputs import InputFormat, TokenBatch

DMP_MODES = ("prefixes", "dialogs")


# ---- which contexts are samples ---------------------------------------------------------------

def dmp_index(table: TurnTable, mode: str = "prefixes") -> np.ndarray:
    """(n, 2) [first turn, last turn] of each DMP sample: 'prefixes' = the dialog up to each turn
    that holds a keyword; 'dialogs' = each whole dialog that holds one."""
    if mode not in DMP_MODES:
        raise UserError(f"dmp_samples {mode!r} is not known; use one of {', '.join(DMP_MODES)}")
    counts = table.keyword_counts()
    turn_dialog = np.repeat(np.arange(table.n_dialogs), np.diff(table.dialog_offsets))
    first_turn = table.dialog_offsets[:-1][turn_dialog]
    if mode == "prefixes":
        ends = np.flatnonzero(counts > 0)
        return np.stack([first_turn[ends], ends], 1).astype(np.int64)
    cs = np.concatenate([[0], np.cumsum(counts)])
    has = cs[table.dialog_offsets[1:]] - cs[table.dialog_offsets[:-1]] > 0
    has &= np.diff(table.dialog_offsets) > 0
    d = np.flatnonzero(has)
    return np.stack([table.dialog_offsets[d], table.dialog_offsets[d + 1] - 1], 1).astype(np.int64)


@dataclass
class CCAIndex:
    """CCA contexts: ``contexts[j] = [first turn, cut turn)`` leads to item ``targets[j]``;
    ``members`` lists the contexts grouped by target (``group_offsets``), ``group_of[j]`` and
    ``position[j]`` place context j in its group."""

    contexts: np.ndarray
    targets: np.ndarray
    members: np.ndarray
    group_offsets: np.ndarray
    group_of: np.ndarray
    position: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def pairable(self) -> np.ndarray:
        """Contexts whose target has at least one other context."""
        sizes = np.diff(self.group_offsets)
        return np.flatnonzero(sizes[self.group_of] >= 2) if len(self.targets) else np.zeros(0, np.int64)


def cca_index(table: TurnTable) -> CCAIndex:
    """One context per dialog that names an item after its first turn: its target is the last
    item named (the simulator puts the target last), the context the turns before the target's
    first mention. Vectorised over all mentions."""
    per_turn = np.diff(table.item_offsets)
    mention_turn = np.repeat(np.arange(table.n_turns), per_turn)
    turn_dialog = np.repeat(np.arange(table.n_dialogs), np.diff(table.dialog_offsets))
    mention_dialog = turn_dialog[mention_turn]
    items = table.turn_items
    target_of = np.full(table.n_dialogs, -1, dtype=np.int64)
    if len(items):
        last = np.flatnonzero(np.r_[mention_dialog[1:] != mention_dialog[:-1], True])
        target_of[mention_dialog[last]] = items[last]
    is_target = items == target_of[mention_dialog]
    dialogs, first = np.unique(mention_dialog[is_target], return_index=True)  # the first such mention
    cut = mention_turn[np.flatnonzero(is_target)[first]]
    start = table.dialog_offsets[dialogs]
    keep = cut > start  # at least one turn of context
    contexts = np.stack([start[keep], cut[keep]], 1)
    targets = target_of[dialogs[keep]]
    ctx = contexts.astype(np.int64).reshape(-1, 2)
    tgt = targets.astype(np.int64)
    order = np.argsort(tgt, kind="stable")
    uniq, starts = np.unique(tgt[order], return_index=True)
    group_offsets = np.concatenate([starts, [len(tgt)]]).astype(np.int64)
    group_of = np.empty(len(tgt), dtype=np.int64)
    position = np.empty(len(tgt), dtype=np.int64)
    sizes = np.diff(group_offsets)
    group_of[order] = np.repeat(np.arange(len(uniq)), sizes)
    position[order] = np.arange(len(tgt)) - np.repeat(group_offsets[:-1], sizes)
    return CCAIndex(ctx, tgt, order.astype(np.int64), group_offsets, group_of, position)


# ---- batches ---------------------------------------------------------------------------------

@dataclass
class BatchSpec:
    """What one micro-batch holds: DMP sample indices and CCA (anchor, positive) context pairs."""

    dmp: np.ndarray | None = None
    cca: np.ndarray | None = None


@dataclass
class PretrainBatch:
    """dmp: the DMP inputs (unmasked; masking happens on the device). cca: 2B CCA inputs, the B
    anchors then their B positives; cca_targets: (B,) the catalog index of each pair's target."""

    dmp: TokenBatch | None = None
    cca: TokenBatch | None = None
    cca_targets: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PretrainBatch":
        return PretrainBatch(
            self.dmp.to(device, non_blocking) if self.dmp is not None else None,
            self.cca.to(device, non_blocking) if self.cca is not None else None,
            self.cca_targets.to(device, non_blocking=non_blocking) if self.cca_targets is not None else None)

    def pin_memory(self) -> "PretrainBatch":
        return PretrainBatch(self.dmp.pin_memory() if self.dmp is not None else None,
                             self.cca.pin_memory() if self.cca is not None else None,
                             self.cca_targets.pin_memory() if self.cca_targets is not None else None)


def collate(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, int]], pad_id: int,
            pad_to_multiple_of: int = 8, max_length: int | None = None) -> TokenBatch:
    """Pad formatted rows (ids, keyword, entity, mask position) to the batch's longest, rounded
    up to a multiple of ``pad_to_multiple_of`` (never beyond ``max_length`` unless a row is)."""
    lengths = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max()) if len(rows) else 0
    width = longest
    if pad_to_multiple_of > 1:
        width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        if max_length is not None:
            width = min(width, max(max_length, longest))
    b = len(rows)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    kw = np.zeros((b, width), dtype=bool)
    ent = np.zeros((b, width), dtype=np.int64)
    for i, (r_ids, r_kw, r_ent, _) in enumerate(rows):  # one slice copy per row
        n = len(r_ids)
        ids[i, :n] = r_ids
        kw[i, :n] = r_kw
        ent[i, :n] = r_ent
    attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    mask_pos = np.fromiter((r[3] for r in rows), dtype=np.int64, count=b)
    return TokenBatch(torch.from_numpy(ids), torch.from_numpy(attention), torch.from_numpy(kw),
                      torch.from_numpy(ent), torch.from_numpy(mask_pos))


class PretrainData(torch.utils.data.Dataset):
    """Builds whole micro-batches from :class:`BatchSpec` keys (used with
    :class:`PretrainBatchSampler` and :func:`first` as collate_fn)."""

    def __init__(self, table: TurnTable, fmt: InputFormat, first_item_id: int, *, dmp: np.ndarray | None = None,
                 cca: CCAIndex | None = None, pad_to_multiple_of: int = 8):
        self.table = table
        self.fmt = fmt
        self.first_item_id = int(first_item_id)
        self.dmp = dmp if dmp is not None else np.zeros((0, 2), np.int64)
        self.cca = cca
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.dmp)

    def dmp_lengths(self) -> np.ndarray:
        """(n_dmp,) the length of each DMP row (cheap: from the turn offsets)."""
        t, d = self.table, self.dmp
        n_ctx = t.turn_offsets[d[:, 1] + 1] - t.turn_offsets[d[:, 0]]
        return np.minimum(n_ctx + len(self.fmt.bos_ids), self.fmt.max_length)

    def cca_lengths(self) -> np.ndarray:
        """(n_contexts,) the length of each CCA row (context, prompt and sep)."""
        t, c = self.table, self.cca.contexts
        fixed = len(self.fmt.bos_ids) + len(self.fmt.prompt_ids) + len(self.fmt.sep_ids)
        return np.minimum(t.turn_offsets[c[:, 1]] - t.turn_offsets[c[:, 0]] + fixed, self.fmt.max_length)

    def _slice(self, first_turn: int, end_turn: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = self.table
        lo, hi = t.turn_offsets[first_turn], t.turn_offsets[end_turn]
        return t.ids[lo:hi], t.keyword[lo:hi], t.entity[lo:hi]

    def dmp_row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        first, last = self.dmp[i]
        return self.fmt.build(*self._slice(first, last + 1), prompt=False)

    def cca_row(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        first, cut = self.cca.contexts[j]
        ids, kw, ent = self._slice(first, cut)
        target = ids == self.first_item_id + self.cca.targets[j]
        if target.any():  # the answer never shows in its own context
            ids, kw, ent = ids.copy(), kw.copy(), ent.copy()
            ids[target] = self.fmt.mask_id
            kw[target] = False
            ent[target] = 0
        return self.fmt.build(ids, kw, ent, prompt=True)

    def __getitem__(self, spec: BatchSpec) -> PretrainBatch:
        pad, mult, max_len = self.fmt.pad_id, self.pad_to_multiple_of, self.fmt.max_length
        out = PretrainBatch()
        if spec.dmp is not None and len(spec.dmp):
            out.dmp = collate([self.dmp_row(int(i)) for i in spec.dmp], pad, mult, max_len)
        if spec.cca is not None and len(spec.cca):
            pairs = np.asarray(spec.cca)
            order = np.concatenate([pairs[:, 0], pairs[:, 1]])
            out.cca = collate([self.cca_row(int(j)) for j in order], pad, mult, max_len)
            out.cca_targets = torch.from_numpy(self.cca.targets[pairs[:, 0]].copy())
        return out


def first(batch: list[PretrainBatch]) -> PretrainBatch:
    """collate_fn for a batch sampler that yields one BatchSpec per batch."""
    return batch[0]


class PretrainBatchSampler:
    """Micro-batches of one epoch, from batch ``start`` on; a pure function of (seed, epoch).

    The epoch walks the primary task once: the DMP samples (shuffled) when DMP is on, else every
    pairable CCA context once as an anchor. With both on, CCA batches follow their own epochs
    (cycles) alongside. A CCA anchor's positive is another context of the same target, drawn at
    random. ``bucket_pool`` > 1 with ``dmp_lengths`` / ``cca_lengths`` (per DMP sample / CCA
    context): the shuffled DMP samples and CCA pairs are regrouped into length-sorted batches in
    shuffled order (lotcrs_plugin.data.length_buckets; a pair counts with its longer side).
    """

    def __init__(self, n_dmp: int, cca: CCAIndex | None, batch_size: int, cca_batch_size: int, *, seed: int,
                 epoch: int = 0, start: int = 0, use_dmp: bool = True, use_cca: bool = True, shuffle: bool = True,
                 bucket_pool: int = 0, dmp_lengths: np.ndarray | None = None,
                 cca_lengths: np.ndarray | None = None):
        self.bucket_pool = bucket_pool if shuffle else 0
        self.dmp_lengths, self.cca_lengths = dmp_lengths, cca_lengths
        self.n_dmp = n_dmp if use_dmp else 0
        self.cca = cca if use_cca else None
        self.anchors = self.cca.pairable if self.cca is not None else np.zeros(0, np.int64)
        if self.cca is not None and not len(self.anchors):
            self.cca = None
        self.batch_size, self.cca_batch_size = batch_size, cca_batch_size
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle
        self.use_dmp = self.n_dmp > 0
        self.n_cca_batches = math.ceil(len(self.anchors) / cca_batch_size) if self.cca is not None else 0
        self.n_batches = math.ceil(self.n_dmp / batch_size) if self.use_dmp else self.n_cca_batches
        self._cycles: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return max(0, self.n_batches - self.start)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def _pairs(self, cycle: int) -> np.ndarray:
        """(n_anchors, 2) the cycle's (anchor, positive) pairs, in batch order."""
        pairs = self._cycles.get(cycle)
        if pairs is None:
            cca, rng = self.cca, self._rng(1, cycle)
            anchors = rng.permutation(self.anchors) if self.shuffle else self.anchors
            g = cca.group_of[anchors]
            sizes = np.diff(cca.group_offsets)[g]
            shift = 1 + (rng.random(len(anchors)) * (sizes - 1)).astype(np.int64)
            partner = cca.members[cca.group_offsets[g] + (cca.position[anchors] + shift) % sizes]
            pairs = np.stack([anchors, partner], 1)
            if self.bucket_pool > 1 and self.cca_lengths is not None:
                longer = np.maximum(self.cca_lengths[anchors], self.cca_lengths[partner])
                pairs = pairs[bucketed_order(np.arange(len(pairs)), longer, self.cca_batch_size,
                                             self.bucket_pool, rng)]
            self._cycles = {cycle: pairs}  # keep one cycle
        return pairs

    def _cca_batch(self, i: int) -> np.ndarray:
        cycle, k = divmod(i, self.n_cca_batches)
        return self._pairs(cycle)[k * self.cca_batch_size:(k + 1) * self.cca_batch_size]

    def __iter__(self) -> Iterator[list[BatchSpec]]:
        order = None
        if self.use_dmp:
            rng = self._rng(0)
            order = rng.permutation(self.n_dmp) if self.shuffle else np.arange(self.n_dmp)
            if self.bucket_pool > 1 and self.dmp_lengths is not None:
                order = bucketed_order(order, self.dmp_lengths, self.batch_size, self.bucket_pool, rng)
        for i in range(self.start, self.n_batches):
            spec = BatchSpec()
            if order is not None:
                spec.dmp = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.cca is not None:
                spec.cca = self._cca_batch(i)
            yield [spec]
