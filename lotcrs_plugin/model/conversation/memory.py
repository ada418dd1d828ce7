"""The responses of the simulated dialogs, looked up by context: the retrieved prompt's source.

One entry per simulated context of the LOT-CRS memory store (the same simulated samples, at most
``retrieval.max_per_item`` per item): its key is the context's representation by the
recommender's backbone (the store's key space), its payload the response that recommends the
context's target, with the item slotted (prompt.SLOT). The keys sit in a
:class:`~lotcrs_plugin.model.retrieval.MemoryStore` (its index, search and files), whose values
are empty: the conversation stage needs the texts, not the states.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.retrieval import MemoryStore

RESPONSES = "responses.json"


class ResponseMemory:
    """``store`` (keys; entry ids = rows of ``responses``) and ``responses``."""

    def __init__(self, store: MemoryStore, responses: Sequence[str]):
        if int(np.max(store.entry_ids, initial=-1)) >= len(responses):
            raise UserError(f"response memory: {len(store)} entries but {len(responses)} responses")
        self.store = store
        self.responses = list(responses)

    @classmethod
    def build(cls, keys: Any, items: Any, responses: Sequence[str],
              config: RetrievalConfig | None = None) -> "ResponseMemory":
        """Every row kept (the rows are already the store's selection): keys [N, H], items [N]."""
        keys = np.asarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[0] != len(responses):
            raise UserError(f"response memory: {len(responses)} responses need keys [N={len(responses)}, H], "
                            f"got {list(keys.shape)}")
        config = replace(config or RetrievalConfig(), max_per_item=None)
        store = MemoryStore.build(keys, np.zeros((keys.shape[0], 0), np.float32), items, config)
        return cls(store, responses)

    def __len__(self) -> int:
        return len(self.store)

    def neighbours(self, queries: Any, k: int) -> list[list[str]]:
        """The responses of the k nearest entries of each query [B, H], nearest first, each text
        once."""
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        hit = self.store.search(q, min(int(k), len(self.store)))
        out: list[list[str]] = []
        for row in hit.entries.tolist():
            texts = [self.responses[e] for e in row if e >= 0]
            out.append(list(dict.fromkeys(texts)))
        return out

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.store.save(folder)
        (folder / RESPONSES).write_text(json.dumps(self.responses, ensure_ascii=False), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ResponseMemory":
        folder = Path(folder)
        path = folder / RESPONSES
        if not path.is_file():
            raise UserError(f"response memory: {path} not found; save the system again")
        return cls(MemoryStore.load(folder), json.loads(path.read_text(encoding="utf-8")))


__all__ = ["ResponseMemory"]
