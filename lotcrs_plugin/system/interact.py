"""Talking to a LOT-CRS system: the top items after a dialog's turns (:func:`recommend`), and a
console dialog (:func:`console`; ``crslab run --restore-system --interact``)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from lotcrs_plugin.data.context_evidence import EvidenceBuilder
from lotcrs_plugin.data.finetune_samples import RecData, RecIndex, turn_roles
from lotcrs_plugin.data.turns import tokenize_dialogs
from lotcrs_plugin.system.samples import autocast
from lotcrs_plugin.system.scoring import TOP_K


def recommend(model: Any, turns: Iterable[Mapping[str, Any]], entity2id: Mapping[str, int], *, max_length: int,
              eval_chunk_elements: int, device: torch.device, bf16: bool, k: int = 10) -> list[int]:
    """Catalog positions of the k best items after a dialog's turns (the layout's turn format:
    role, raw_text, movies, entity), ranked as a test sample is (the vote and its tail slots
    included)."""
    turns = list(turns)
    bb = model.backbone
    table = tokenize_dialogs([{"dialog": turns}], bb.tokenizer, bb.sep_ids, model.items, entity2id)
    index = RecIndex(np.array([[0, table.n_turns]], dtype=np.int64), np.zeros(1, np.int64), np.zeros(1, bool),
                     np.zeros(1, np.int64))
    evidence = (EvidenceBuilder(table, turn_roles([{"dialog": turns}]), model.items.entity_ids)
                if model.evidence is not None else None)
    batch = RecData(table, bb.input_format(max_length), bb.first_item_id, index,
                    evidence=evidence)[np.zeros(1, np.int64)].to(device)
    was = model.training
    model.eval()
    with torch.no_grad(), autocast(device, bf16):
        ranking = model.rank_items(batch.tokens, None, max(k, TOP_K), eval_chunk_elements, evidence=batch.evidence)
    model.train(was)
    return ranking.top_ids[0, :k].tolist()


def console(items: Any, get_input: Callable[[], str], finished: Callable[[], bool],
            recommend_after: Callable[[list[dict[str, Any]]], list[int]], *,
            link: Callable[[str], list[str]] | None = None,
            reply: Callable[[list[dict[str, Any]], int], str] | None = None) -> None:
    """A console dialog: each message (items named by their title; ``link``: its attribute words as
    entities, as a test turn has them) gets the top item and four more; ``reply``: the
    conversation stage's response naming the top item (else a fixed sentence)."""
    shown = [n.lower() for n in items.display_names]
    turns: list[dict[str, Any]] = []
    while True:
        try:
            text = get_input()
        except EOFError:  # the end of a script's standard input
            print()
            break
        if finished():
            break
        low = text.lower()
        movies = [items.entity_names[i] for i, name in enumerate(shown) if name in low]
        turns.append({"role": "Seeker", "raw_text": text, "text": low.split(), "movies": movies,
                      "entity": link(text) if link is not None else []})
        top = recommend_after(turns)
        reply_text = (reply(turns, top[0]) if reply is not None
                      else f"You should watch {items.display_names[top[0]]}.")
        print(f"Recommender: {reply_text} (also: {'; '.join(items.display_names[i] for i in top[1:5])})")
        turns.append({"role": "Recommender", "raw_text": reply_text, "text": reply_text.lower().split(),
                      "movies": [items.entity_names[top[0]]], "entity": []})


__all__ = ["console", "recommend"]
