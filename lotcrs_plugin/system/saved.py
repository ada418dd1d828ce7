"""The saved LOT-CRS system (``crslab run --save-system`` / ``--restore-system``): the tested
model's state dict in ``<root>/save/<model_file>`` (loaded with weights_only=True), its memory
store beside it (``.store/``) and its kNN vote (``.knn/``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.retrieval import MemoryStore
from lotcrs_plugin.system.loop import atomic_save
from lotcrs_plugin.system.rerank import load_knn

SYSTEM_FORMAT = "lotcrs-system"


def store_file(model_file: str | os.PathLike) -> Path:
    return Path(model_file).with_suffix(".store")


def knn_file(model_file: str | os.PathLike) -> Path:
    return Path(model_file).with_suffix(".knn")


def save_system(model: Any, model_file: str | os.PathLike) -> None:
    """The model, its memory store and its vote (those it has)."""
    state = {"format": SYSTEM_FORMAT, "version": 1, "model_state_dict": model.state_dict(),
             "backbone": model.backbone_name, "items": model.items.entity_ids, "retrieval": model.fusion is not None}
    atomic_save(state, Path(model_file))
    if model.store is not None:
        model.store.save(store_file(model_file))
    if model.knn is not None:
        model.knn.save(knn_file(model_file))
    logger.info(f"[lotcrs] system saved to {model_file}")


def restore_system(model: Any, model_file: str | os.PathLike, device: torch.device) -> None:
    """Load into ``model`` a system written by :func:`save_system` for this config (UserError names
    the file and what does not match)."""
    model = model.module if isinstance(model, torch.nn.DataParallel) else model
    path = Path(model_file)
    if not path.is_file():
        raise UserError(f"restore-system: {path} does not exist; run once with --save-system (or set model_file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != SYSTEM_FORMAT:
        raise UserError(f"{path}: not a saved LOT-CRS system")
    if state["backbone"] != model.backbone_name or state["items"] != model.items.entity_ids:
        raise UserError(f"{path}: a '{state['backbone']}' system over {len(state['items'])} items; the config "
                        f"has backbone: {model.backbone_name} and {len(model.items)} items")
    if state["retrieval"] != (model.fusion is not None):
        raise UserError(f"{path}: saved with lotcrs.retrieval: {str(state['retrieval']).lower()}; set the same")
    model.load_state_dict(state["model_state_dict"])
    if model.fusion is not None:
        store = store_file(model_file)
        if not (store / "manifest.json").is_file():
            raise UserError(f"restore-system: the memory store {store} is missing; save the system again")
        model.store = MemoryStore.load(store)
    if model.rerank_cfg.knn_on:
        knn = knn_file(model_file)
        if not (knn / "knn.json").is_file():
            raise UserError(f"restore-system: the kNN store {knn} is missing; save the system again "
                            f"(or set rerank.knn_weight: 0)")
        load_knn(model, knn, device)
    logger.info(f"[lotcrs] restored {path}")


__all__ = ["SYSTEM_FORMAT", "knn_file", "restore_system", "save_system", "store_file"]
