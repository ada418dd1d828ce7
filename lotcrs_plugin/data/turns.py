"""Every turn of some dialogs tokenized once, as flat arrays (:class:`TurnTable`).

:func:`tokenize_dialogs`: every turn is tokenized once (one batched call of the backbone's fast
tokenizer) after its item mentions are replaced by item tokens (``<item_k>``); the tokens of
attribute names (the turn's non-item entities found in its text) are marked. Result: a
:class:`TurnTable`, flat numpy arrays (token ids, keyword flags, entity id at the first token of
each keyword span) with per-turn and per-dialog offsets; each turn is followed by the backbone's
separator. Spans are mapped to tokens with ``searchsorted`` over the tokenizer's character
offsets, for all turns at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lotcrs_plugin.data.item_vocab import ItemVocab, _attribute_surfaces, _find_all, _item_surfaces
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.base import ITEM_TOKEN

_CHUNK = 8192  # turns per tokenizer call (bounds the memory of the offsets lists)


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
