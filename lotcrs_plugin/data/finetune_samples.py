"""LOT-CRS fine-tuning samples (pipeline step 3) and their batches.

Dialogs are tokenized once with the backbone's tokenizer into a
:class:`~lotcrs_plugin.data.turns.TurnTable` (item mentions become item tokens), then:

- real data (:func:`recommendation_index`): one sample per distinct item that a Recommender turn
  names (``movies``), its context the dialog's turns before that turn; ``mentioned`` says whether
  the target was already named earlier in the dialog (by either role), which the evaluator reports
  as the subset ``unmentioned`` (the samples a model cannot solve by repeating the context);
- simulated data (:func:`simulated_index`): one sample per simulated dialog, the context before
  the target's first mention with every occurrence of the target's token replaced by the mask
  token (the contexts of the memory store and of a teacher trained on simulated data).

A row is ``[bos] context[-budget:] prompt [sep]`` with at most ``max_length`` tokens (cut from the
left, see :class:`~lotcrs_plugin.model.backbones.InputFormat`); :class:`RecData` builds whole
batches from index arrays (dynamic padding), :class:`IndexBatches` orders them (a pure function of
seed and epoch, so a resumed run sees the same batches).

``LOTCRSDataLoader`` fills CRSLab's dataloader slot of the model ``LOTCRS``: the system reads the
processed folder's raw dialogs itself (the backbone's tokenizer, not CRSLab's, makes the tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from lotcrs_plugin.data.context_evidence import EvidenceBatch, EvidenceBuilder
from lotcrs_plugin.data.length_buckets import bucketed_order
from lotcrs_plugin.data.pretrain_samples import cca_index, collate
from lotcrs_plugin.data.turns import TurnTable
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.inputs import InputFormat, TokenBatch

RECOMMENDER = "Recommender"
SUBSET_UNMENTIONED = "unmentioned"  # the evaluator subset: targets not named earlier in the dialog


@dataclass
class RecIndex:
    """Which contexts are samples: sample i reads turns ``[contexts[i, 0], contexts[i, 1])`` and
    its answer is catalog item ``targets[i]``.

    mentioned: (n,) bool, the target is named in the context. dialogs: (n,) the dialog index.
    mask_target: the target's item token is replaced by the mask token in the context.
    """

    contexts: np.ndarray
    targets: np.ndarray
    mentioned: np.ndarray
    dialogs: np.ndarray
    mask_target: bool = False

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, rows: np.ndarray) -> "RecIndex":
        rows = np.asarray(rows, dtype=np.int64)
        return RecIndex(self.contexts[rows], self.targets[rows], self.mentioned[rows], self.dialogs[rows],
                        self.mask_target)


def turn_roles(dialogs: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """(n_turns,) bool: the turn is the Recommender's, in the order tokenize_dialogs reads them."""
    return np.fromiter((turn.get("role") == RECOMMENDER for conv in dialogs for turn in conv["dialog"]),
                       dtype=bool)


def recommendation_index(table: TurnTable, recommender: np.ndarray) -> RecIndex:
    """One sample per distinct item named in a Recommender turn that has at least one turn before
    it (vectorised over all mentions)."""
    if recommender.shape[0] != table.n_turns:
        raise ValueError(f"recommendation_index: {recommender.shape[0]} roles for {table.n_turns} turns")
    per_turn = np.diff(table.item_offsets)
    mention_turn = np.repeat(np.arange(table.n_turns), per_turn)
    turn_dialog = np.repeat(np.arange(table.n_dialogs), np.diff(table.dialog_offsets))
    mention_dialog = turn_dialog[mention_turn]
    items = table.turn_items.astype(np.int64)
    n_items = int(items.max()) + 1 if len(items) else 1
    # the first turn in which each (dialog, item) is named
    pair = mention_dialog * n_items + items
    order = np.lexsort((mention_turn, pair))
    first_of_pair = np.empty(0, dtype=np.int64)
    uniq, first = np.unique(pair[order], return_index=True)
    if len(uniq):
        first_of_pair = mention_turn[order][first]
    first_turn = first_of_pair[np.searchsorted(uniq, pair)] if len(uniq) else mention_turn
    keep = recommender[mention_turn] & (mention_turn > table.dialog_offsets[mention_dialog])
    # one sample per (turn, item): the first occurrence in the turn's list
    _, once = np.unique(mention_turn * n_items + items, return_index=True)
    is_once = np.zeros(len(items), dtype=bool)
    is_once[once] = True
    rows = np.flatnonzero(keep & is_once)
    contexts = np.stack([table.dialog_offsets[mention_dialog[rows]], mention_turn[rows]], 1).astype(np.int64)
    return RecIndex(contexts.reshape(-1, 2), items[rows], first_turn[rows] < mention_turn[rows],
                    mention_dialog[rows].astype(np.int64), mask_target=False)


def simulated_index(table: TurnTable) -> RecIndex:
    """One sample per simulated dialog: the turns before its target's first mention (the target is
    the last item named, as the simulator writes it), target masked in the context."""
    cca = cca_index(table)
    n = len(cca)
    starts = cca.contexts[:, 0] if n else np.zeros(0, np.int64)
    dialogs = np.searchsorted(table.dialog_offsets, starts, side="right") - 1
    return RecIndex(cca.contexts.reshape(-1, 2).astype(np.int64), cca.targets.astype(np.int64),
                    np.zeros(n, dtype=bool), dialogs.astype(np.int64), mask_target=True)


def per_item_rows(targets: np.ndarray, max_per_item: int | None, seed: int | None = None) -> np.ndarray:
    """Rows kept when each item may have at most ``max_per_item`` entries: the memory store's rule
    (lotcrs_plugin.model.retrieval), applied before encoding so that dropped rows cost nothing."""
    from lotcrs_plugin.model.retrieval import _select_per_item

    return _select_per_item(np.asarray(targets, dtype=np.int64), max_per_item, seed)


# ---- batches ---------------------------------------------------------------------------------

@dataclass
class FinetuneBatch:
    """tokens: the formatted contexts (prompt and mask included); targets: (B,) catalog index;
    sample_idx: (B,) the samples' indices in their :class:`RecIndex` (the teacher's scores are
    looked up by it); mentioned: (B,) bool, the target is named in the context; evidence: what
    the whole context names (items, attributes) for the model's evidence term, None when off."""

    tokens: TokenBatch
    targets: torch.Tensor
    sample_idx: torch.Tensor
    mentioned: torch.Tensor
    evidence: EvidenceBatch | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FinetuneBatch":
        return FinetuneBatch(self.tokens.to(device, non_blocking), self.targets.to(device, non_blocking=non_blocking),
                             self.sample_idx.to(device, non_blocking=non_blocking),
                             self.mentioned.to(device, non_blocking=non_blocking),
                             None if self.evidence is None else self.evidence.to(device, non_blocking))

    def pin_memory(self) -> "FinetuneBatch":
        return FinetuneBatch(self.tokens.pin_memory(), self.targets.pin_memory(), self.sample_idx.pin_memory(),
                             self.mentioned.pin_memory(),
                             None if self.evidence is None else self.evidence.pin_memory())

    def __len__(self) -> int:
        return int(self.targets.shape[0])


class RecData(torch.utils.data.Dataset):
    """Whole batches of recommendation samples, built from index arrays (use with
    :class:`IndexBatches` as batch_sampler and :func:`first` as collate_fn). ``evidence``: builds
    each batch's :class:`EvidenceBatch` from the same table (None: batches carry none)."""

    def __init__(self, table: TurnTable, fmt: InputFormat, first_item_id: int, index: RecIndex,
                 pad_to_multiple_of: int = 8, evidence: EvidenceBuilder | None = None):
        self.table = table
        self.fmt = fmt
        self.first_item_id = int(first_item_id)
        self.index = index
        self.pad_to_multiple_of = pad_to_multiple_of
        self.evidence = evidence

    def subset(self, rows: np.ndarray) -> "RecData":
        """The samples ``rows`` (renumbered from 0), with the same table, format and evidence."""
        return RecData(self.table, self.fmt, self.first_item_id, self.index.subset(rows), self.pad_to_multiple_of,
                       self.evidence)

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> np.ndarray:
        """(n,) the length of each formatted row (cheap: from the turn offsets)."""
        t, c = self.table, self.index.contexts
        n_ctx = t.turn_offsets[c[:, 1]] - t.turn_offsets[c[:, 0]]
        fixed = len(self.fmt.bos_ids) + len(self.fmt.prompt_ids) + len(self.fmt.sep_ids)
        return np.minimum(n_ctx + fixed, self.fmt.max_length)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        first, cut = self.index.contexts[i]
        t = self.table
        lo, hi = t.turn_offsets[first], t.turn_offsets[cut]
        ids, kw, ent = t.ids[lo:hi], t.keyword[lo:hi], t.entity[lo:hi]
        if self.index.mask_target:
            hit = ids == self.first_item_id + self.index.targets[i]
            if hit.any():  # the answer never shows in its own context
                ids, kw, ent = ids.copy(), kw.copy(), ent.copy()
                ids[hit] = self.fmt.mask_id
                kw[hit] = False
                ent[hit] = 0
        return self.fmt.build(ids, kw, ent, prompt=True)

    def __getitem__(self, rows: np.ndarray) -> FinetuneBatch:
        rows = np.asarray(rows, dtype=np.int64)
        tokens = collate([self.row(int(i)) for i in rows], self.fmt.pad_id, self.pad_to_multiple_of,
                         self.fmt.max_length)
        targets = self.index.targets[rows]
        evidence = None
        if self.evidence is not None:  # a simulated sample's masked target is no evidence for itself
            evidence = self.evidence.batch(self.index.contexts[rows], targets if self.index.mask_target else None)
        return FinetuneBatch(tokens, torch.from_numpy(targets.copy()), torch.from_numpy(rows.copy()),
                             torch.from_numpy(self.index.mentioned[rows].copy()), evidence)


def first(batch: list[FinetuneBatch]) -> FinetuneBatch:
    """collate_fn for a batch sampler that yields one index array per batch."""
    return batch[0]


class IndexBatches:
    """Index arrays of one epoch from batch ``start`` on.

    shuffle: a permutation drawn from (seed, epoch), so a resumed epoch yields the same batches;
    with ``bucket_pool`` > 1 and ``lengths``, regrouped into length-sorted batches in shuffled
    order (lotcrs_plugin.data.length_buckets). Without shuffle, rows are sorted by length
    (``lengths``) to cut padding; every row comes once. limit: at most this many batches (0: all).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 lengths: np.ndarray | None = None, start: int = 0, limit: int = 0, bucket_pool: int = 0):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {batch_size}")
        self.n, self.batch_size, self.start = int(n), int(batch_size), int(start)
        if shuffle:
            rng = np.random.default_rng([seed, epoch])
            self.order = rng.permutation(self.n)
            if bucket_pool > 1 and lengths is not None:
                self.order = bucketed_order(self.order, lengths, self.batch_size, bucket_pool, rng)
        elif lengths is not None:
            self.order = np.argsort(np.asarray(lengths), kind="stable")
        else:
            self.order = np.arange(self.n)
        total = math.ceil(self.n / self.batch_size)
        self.n_batches = min(total, limit) if limit else total

    def __len__(self) -> int:
        return max(0, self.n_batches - self.start)

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for b in range(self.start, self.n_batches):
            yield [self.order[b * self.batch_size:(b + 1) * self.batch_size]]


def loader(data: RecData, batches: IndexBatches, *, num_workers: int = 0, pin_memory: bool = False,
           seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over ``data`` in the order of ``batches``; its own generator keeps the global
    random state (dropout) untouched, so a resumed run does not diverge."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=first, num_workers=num_workers,
                                       pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                                       generator=generator)


class LOTCRSDataLoader:
    """CRSLab's get_dataloader slot for ``LOTCRS``: keeps what it is given (the system reads and
    tokenizes the dataset folder's dialogs with the backbone's tokenizer)."""

    def __init__(self, opt: Any, dataset: Any, vocab: Mapping[str, Any]):
        self.opt, self.dataset, self.vocab = opt, dataset, vocab


def sample_counts(index: RecIndex) -> dict[str, int]:
    """For logs: samples, and those whose target is mentioned earlier / not."""
    m = int(index.mentioned.sum())
    return {"samples": len(index), "mentioned": m, SUBSET_UNMENTIONED: len(index) - m}


__all__: Sequence[str] = ("FinetuneBatch", "IndexBatches", "LOTCRSDataLoader", "RecData", "RecIndex",
                          "SUBSET_UNMENTIONED", "first", "loader", "per_item_rows", "recommendation_index",
                          "sample_counts", "simulated_index", "turn_roles")
