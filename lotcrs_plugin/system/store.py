"""Stage 2 of the LOT-CRS pipeline: the memory store (lotcrs_plugin.model.retrieval.MemoryStore).

One entry per simulated dialog (at most ``retrieval.max_per_item`` per item): key = the
representation of its context with the target masked, value = the state the head reads, built
with the current (pre-trained) backbone and attached to the model (``model.store``). Kept fixed
(``lotcrs.store_refresh: fixed``, the authors') or recomputed with the fine-tuned backbone
(``store_refresh: epoch``: :meth:`StoreStage.refresh`, same entries).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.data.finetune_samples import per_item_rows
from lotcrs_plugin.model.retrieval import MemoryStore
from lotcrs_plugin.system.samples import RecSamples, autocast

ROWS_FILE = "simulated_rows.npy"  # beside the store: which simulated sample each entry is


class StoreStage:
    """Builds, refreshes, saves and loads ``model.store`` from the simulated samples."""

    def __init__(self, model: torch.nn.Module, samples: RecSamples, cfg: RetrievalConfig, *, device: torch.device,
                 bf16: bool):
        self.model, self.samples, self.cfg = model, samples, cfg
        self.device, self.bf16 = device, bf16
        self.rows: np.ndarray | None = None  # rows of the simulated data held by the store
        self.seconds = 0.0

    @torch.no_grad()
    def encode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of the simulated samples ``rows`` with the current backbone."""
        part = self.samples.data("simulated").subset(rows)
        was = self.model.training
        self.model.eval()
        keys = values = None
        for batch in self.samples.batches(part, train=False):
            batch = batch.to(self.device)
            with autocast(self.device, self.bf16):
                k, v = self.model.store_entries(batch.tokens)
            if keys is None:
                keys = np.empty((len(part), k.shape[1]), np.float32)
                values = np.empty((len(part), v.shape[1]), np.float32)
            idx = batch.sample_idx.cpu().numpy()
            keys[idx], values[idx] = k.float().cpu().numpy(), v.float().cpu().numpy()
        self.model.train(was)
        return keys, values

    def build(self) -> MemoryStore:
        started = time.perf_counter()
        cfg = self.cfg
        sim = self.samples.data("simulated")
        rows = per_item_rows(sim.index.targets, cfg.max_per_item, cfg.sample_seed)
        keys, values = self.encode(rows)
        store = MemoryStore.build(keys, values, sim.index.targets[rows], cfg)
        self.rows = rows[store.entry_ids]  # entry i of the store is simulated sample rows[i]
        self.model.store = store
        self.seconds = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] 2/4 memory store: {len(store)} entries for {len(store.unique_items)} items "
                    f"({cfg.index} index, top-{cfg.top_k}, {self.seconds}s)")
        return store

    def refresh(self) -> None:
        """Recompute the store's keys and values with the current backbone (same entries)."""
        keys, values = self.encode(self.rows)
        self.model.store.refresh(keys, values)

    def save(self, folder: Path) -> None:
        self.model.store.save(folder)
        np.save(folder / ROWS_FILE, self.rows)

    def load(self, folder: Path) -> None:
        self.model.store = MemoryStore.load(folder)
        rows = folder / ROWS_FILE
        self.rows = np.load(rows) if rows.is_file() else None


__all__ = ["StoreStage"]
