"""LOT-CRS pre-training samples from dialogs, and their batches (dynamic padding).

Input: dialogs in the layout's format (``{conv_id, dialog: [{role, raw_text, movies, entity,
...}]}``): the simulated data (every item the target of N conversations, the target last) or any
split of a processed dataset. Steps:

1. :func:`tokenize_dialogs`: every turn is tokenized once (one batched call of the backbone's
   fast tokenizer) after its item mentions are replaced by item tokens (``<item_k>``); the
   tokens of attribute names (the turn's non-item entities found in its text) are marked. Result:
   a :class:`TurnTable`, flat numpy arrays (token ids, keyword flags, entity id at the first token
   of each keyword span) with per-turn and per-dialog offsets; each turn is followed by the
   backbone's separator. Spans are mapped to tokens with ``searchsorted`` over the tokenizer's
   character offsets, for all turns at once.
2. :func:`dmp_index` / :func:`cca_index`: which contexts are samples. DMP: dialog prefixes
   ending at each turn that holds a keyword (or whole dialogs). CCA: for each dialog, the turns
   before the first mention of its target (the last item mentioned) plus the prompt, the target
   replaced by the mask token wherever it occurs; contexts of the same target are positives.
3. :class:`PretrainData` + :class:`PretrainBatchSampler`: a batch is built whole in the
   DataLoader worker (slice, cut from the left, pad to the longest row rounded up to a multiple
   of 8); the order is a pure function of (seed, epoch), so a run resumes at any batch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from lotcrs_plugin.data.length_buckets import bucketed_order
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.base import ITEM_TOKEN, InputFormat, TokenBatch

DMP_MODES = ("prefixes", "dialogs")
_TRAILING_PAREN = re.compile(r"\s*\([^()]*\)\s*$")
_CHUNK = 8192  # turns per tokenizer call (bounds the memory of the offsets lists)


# ---- the catalog's items ---------------------------------------------------------------------

@dataclass
class ItemVocab:
    """The catalog in its order: item k has entity id ``entity_ids[k]``, is named
    ``entity_names[k]`` in dialogs (``movies``) and written ``display_names[k]`` in text."""

    entity_ids: list[int]
    entity_names: list[str]
    display_names: list[str]
    index_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index_of = {name: k for k, name in enumerate(self.entity_names)}

    def __len__(self) -> int:
        return len(self.entity_ids)

    @classmethod
    def from_side_data(cls, side_data: Mapping[str, Any], vocab: Mapping[str, Any]) -> "ItemVocab":
        """From a CRSLab dataset of the processed layout (side_data item_entity_ids/item_stats)."""
        ids = side_data.get("item_entity_ids")
        if not ids:
            raise UserError("the dataset gives no item list (side_data['item_entity_ids']); pre-training reads a "
                            "processed dataset (docs/DATA_LAYOUT.md)")
        id2entity = vocab["id2entity"]
        stats = side_data.get("item_stats") or {}
        names = [id2entity[i] for i in ids]
        shown = [(stats.get(i) or {}).get("name") or n for i, n in zip(ids, names)]
        return cls([int(i) for i in ids], names, [_display(n) for n in shown])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ItemVocab":
        """From a processed dataset folder (item_ids.json, entity2id.json, item_stats.json)."""
        folder = Path(folder)
        ids = json.loads((folder / "item_ids.json").read_text(encoding="utf-8"))
        entity2id = json.loads((folder / "entity2id.json").read_text(encoding="utf-8"))
        stats = json.loads((folder / "item_stats.json").read_text(encoding="utf-8"))
        id2entity = {i: e for e, i in entity2id.items()}
        names = [id2entity[i] for i in ids]
        shown = [(stats.get(str(i)) or {}).get("name") or n for i, n in zip(ids, names)]
        return cls([int(i) for i in ids], names, [_display(n) for n in shown])


def _display(name: str) -> str:
    from lotcrs_plugin.data.catalog import item_display_name

    return item_display_name(name)


def _surfaces(*names: str) -> tuple[str, ...]:
    """Distinct lowercased spellings, longest first (the longest match wins)."""
    out = {n.strip().lower() for n in names if n and n.strip()}
    return tuple(sorted(out, key=len, reverse=True))


def _item_surfaces(entity_name: str, display: str) -> tuple[tuple[str, bool], ...]:
    """(spelling, match every occurrence): a name without its "(year)" can be a common word
    ("It"), so only its first occurrence counts."""
    full = _surfaces(entity_name, display)
    short = _surfaces(_TRAILING_PAREN.sub("", display))
    return tuple((s, True) for s in full) + tuple((s, False) for s in short if s not in full)


def _attribute_surfaces(name: str) -> tuple[str, ...]:
    from lotcrs_plugin.data.catalog import attribute_display_name

    return _surfaces(name, attribute_display_name(name, "genre"), attribute_display_name(name, "person"))


def _find_all(lower: str, surface: str) -> list[tuple[int, int]]:
    """Occurrences of ``surface`` in ``lower`` that start and end at word boundaries."""
    out, start, n = [], 0, len(surface)
    while True:
        i = lower.find(surface, start)
        if i < 0:
            return out
        j = i + n
        if (i == 0 or not lower[i - 1].isalnum()) and (j == len(lower) or not lower[j].isalnum()):
            out.append((i, j))
        start = i + 1


# ---- turns -----------------------------------------------------------------------------------

@dataclass
class TurnTable:
    """Every turn of some dialogs as flat arrays (each turn followed by the separator ids).

    ids / keyword / entity (int32 / bool / int32): one entry per token; turn t is
    ``[turn_offsets[t], turn_offsets[t+1])``.
    Dialog d holds turns ``[dialog_offsets[d], dialog_offsets[d+1])``. ``turn_items`` (CSR with
    ``item_offsets``): the catalog indices named in each turn's ``movies``.
    """

    ids: np.ndarray
    keyword: np.ndarray
    entity: np.ndarray
    turn_offsets: np.ndarray
    dialog_offsets: np.ndarray
    item_offsets: np.ndarray
    turn_items: np.ndarray
    stats: dict[str, int]

    @property
    def n_dialogs(self) -> int:
        return len(self.dialog_offsets) - 1

    @property
    def n_turns(self) -> int:
        return len(self.turn_offsets) - 1

    def keyword_counts(self) -> np.ndarray:
        """(n_turns,) keyword tokens per turn."""
        cs = np.concatenate([[0], np.cumsum(self.keyword, dtype=np.int64)])
        return cs[self.turn_offsets[1:]] - cs[self.turn_offsets[:-1]]


class _Marker:
    """Rewrites one turn: item mentions become item tokens, keyword spans are recorded."""

    def __init__(self, items: ItemVocab, entity2id: Mapping[str, int]):
        self.items = items
        self.entity2id = entity2id
        self.item_entities = set(items.entity_ids)
        self._item_surf: dict[int, tuple[tuple[str, bool], ...]] = {}
        self._attr_surf: dict[str, tuple[str, ...]] = {}
        self.stats = {"item_mentions": 0, "items_found": 0, "attribute_mentions": 0, "attributes_found": 0}

    def __call__(self, turn: Mapping[str, Any]) -> tuple[str, list[tuple[int, int, int]], list[int]]:
        """(new text, [(start, end, entity id)] keyword spans in it, catalog indices mentioned)."""
        text = turn.get("raw_text")
        if not isinstance(text, str):
            text = " ".join(turn.get("text") or [])
        lower = text.lower()
        found: list[tuple[int, int, int, bool]] = []  # start, end, item index or entity id, is item
        mentioned: list[int] = []
        for name in turn.get("movies") or ():
            k = self.items.index_of.get(name)
            if k is None:
                continue
            mentioned.append(k)
            self.stats["item_mentions"] += 1
            surf = self._item_surf.get(k)
            if surf is None:
                surf = self._item_surf[k] = _item_surfaces(name, self.items.display_names[k])
            for s, every in surf:
                occ = _find_all(lower, s)
                if occ:
                    found += [(i, j, k, True) for i, j in (occ if every else occ[:1])]
                    self.stats["items_found"] += 1
                    break
        for name in turn.get("entity") or ():
            eid = self.entity2id.get(name)
            if not eid or eid in self.item_entities:
                continue
            self.stats["attribute_mentions"] += 1
            surf = self._attr_surf.get(name)
            if surf is None:
                surf = self._attr_surf[name] = _attribute_surfaces(name)
            for s in surf:
                occ = _find_all(lower, s)
                if occ:
                    found += [(i, j, eid, False) for i, j in occ]
                    self.stats["attributes_found"] += 1
                    break
        if not found:
            return text, [], mentioned
        found.sort(key=lambda f: (f[0], -(f[1] - f[0])))
        pieces, spans, pos, cur = [], [], 0, 0
        for start, end, payload, is_item in found:
            if start < pos:  # overlaps a longer or earlier mention
                continue
            pieces.append(text[pos:start])
            cur += start - pos
            piece = ITEM_TOKEN.format(payload) if is_item else text[start:end]
            spans.append((cur, cur + len(piece), self.items.entity_ids[payload] if is_item else payload))
            pieces.append(piece)
            cur += len(piece)
            pos = end
        pieces.append(text[pos:])
        return "".join(pieces), spans, mentioned


def _encode(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, no special tokens. A fast tokenizer's Rust backend
    is called directly: transformers' own call gives the same ids and offsets but converts every
    encoding in Python, half of the tokenization time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "is_fast", False):
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_dialogs(dialogs: Iterable[Mapping[str, Any]], tokenizer: Any, sep_ids: Sequence[int],
                     items: ItemVocab, entity2id: Mapping[str, int]) -> TurnTable:
    """Tokenize every turn of ``dialogs`` once (see the module docstring).

    ``tokenizer`` must already hold the item tokens (``Backbone.add_item_tokens``) and return
    character offsets (a fast tokenizer).
    """
    probe = ITEM_TOKEN.format(len(items) - 1)
    if len(items) and tokenizer.convert_tokens_to_ids(probe) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no item token {probe!r}: call Backbone.add_item_tokens first")
    marker = _Marker(items, entity2id)
    texts: list[str] = []
    span_turn, span_start, span_end, span_ent = [], [], [], []
    turn_items: list[int] = []
    item_counts: list[int] = []
    dialog_sizes: list[int] = []
    for n, conv in enumerate(dialogs):
        turns = conv.get("dialog") if isinstance(conv, Mapping) else None
        if not isinstance(turns, list):
            raise UserError(f"dialog #{n}: expected {{\"conv_id\", \"dialog\": [turn, ...]}}, got {str(conv)[:80]!r}")
        dialog_sizes.append(len(turns))
        for turn in turns:
            text, spans, mentioned = marker(turn)
            t = len(texts)
            texts.append(text)
            for s, e, eid in spans:
                span_turn.append(t)
                span_start.append(s)
                span_end.append(e)
                span_ent.append(eid)
            turn_items += mentioned
            item_counts.append(len(mentioned))
    ids_parts, off_parts, count_parts = [], [], []
    chain = itertools.chain.from_iterable
    for lo in range(0, len(texts), _CHUNK):  # chunks bound the memory of the tokenizer's lists
        ids, offs = _encode(tokenizer, texts[lo:lo + _CHUNK])
        counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        n = int(counts.sum())
        count_parts.append(counts)
        ids_parts.append(np.fromiter(chain(ids), dtype=np.int64, count=n))
        off_parts.append(np.fromiter(chain(chain(offs)), dtype=np.int64, count=2 * n).reshape(-1, 2))
    n_turns = len(texts)
    counts_arr = np.concatenate(count_parts) if count_parts else np.zeros(0, np.int64)
    flat_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    offsets = np.concatenate(off_parts) if off_parts else np.zeros((0, 2), np.int64)
    tok_turn = np.repeat(np.arange(n_turns), counts_arr)
    # global character coordinates: turn t's text starts at char_base[t]
    char_base = np.concatenate([[0], np.cumsum([len(t) + 1 for t in texts], dtype=np.int64)])[:-1]
    tok_start = offsets[:, 0] + char_base[tok_turn]
    tok_end = offsets[:, 1] + char_base[tok_turn]
    keyword = np.zeros(len(flat_ids), dtype=bool)
    entity = np.zeros(len(flat_ids), dtype=np.int64)
    if span_turn:
        st = np.asarray(span_turn, dtype=np.int64)
        s_start = np.asarray(span_start, dtype=np.int64) + char_base[st]
        s_end = np.asarray(span_end, dtype=np.int64) + char_base[st]
        first = np.searchsorted(tok_end, s_start, side="right")  # first token ending after the span starts
        last = np.searchsorted(tok_start, s_end, side="left")    # tokens starting before the span ends
        ok = first < last
        diff = np.zeros(len(flat_ids) + 1, dtype=np.int64)
        np.add.at(diff, first[ok], 1)
        np.add.at(diff, last[ok], -1)
        keyword = np.cumsum(diff[:-1]) > 0
        entity[first[ok]] = np.asarray(span_ent, dtype=np.int64)[ok]
    # insert the separator after every turn
    sep = np.asarray(sep_ids, dtype=np.int64)
    n_sep = len(sep)
    new_counts = counts_arr + n_sep
    turn_offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
    total = int(turn_offsets[-1])
    dest = np.arange(len(flat_ids)) + tok_turn * n_sep
    # int32 storage: a ReDial-sized simulation holds tens of millions of tokens
    out_ids = np.empty(total, dtype=np.int32)
    out_kw = np.zeros(total, dtype=bool)
    out_ent = np.zeros(total, dtype=np.int32)
    out_ids[dest] = flat_ids
    out_kw[dest] = keyword
    out_ent[dest] = entity
    sep_pos = (turn_offsets[1:, None] - n_sep + np.arange(n_sep)[None, :]).reshape(-1)
    out_ids[sep_pos] = np.tile(sep, n_turns)
    dialog_offsets = np.concatenate([[0], np.cumsum(dialog_sizes, dtype=np.int64)]).astype(np.int64)
    item_offsets = np.concatenate([[0], np.cumsum(item_counts, dtype=np.int64)]).astype(np.int64)
    stats = dict(marker.stats, dialogs=len(dialog_sizes), turns=n_turns, tokens=total,
                 keyword_tokens=int(out_kw.sum()))
    return TurnTable(out_ids, out_kw, out_ent, turn_offsets, dialog_offsets, item_offsets,
                     np.asarray(turn_items, dtype=np.int64), stats)


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
