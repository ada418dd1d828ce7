"""The recommendation samples every stage of the LOT-CRS pipeline reads: the dataset's splits and
the balanced simulated dialogs, tokenized by the model's current backbone (lotcrs_plugin.data.finetune_samples),
and their batches."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from loguru import logger

from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
from lotcrs_plugin.data.context_evidence import EvidenceBuilder
from lotcrs_plugin.data.finetune_samples import (
    IndexBatches, RecData, loader, recommendation_index, sample_counts, simulated_index, turn_roles,
)
from lotcrs_plugin.data.turns import tokenize_dialogs
from lotcrs_plugin.errors import UserError


def dataset_folder(opt: Any) -> Path:
    """The processed folder of the configured dataset (the plugin's datasets know theirs)."""
    from crslab.data import dataset_register_table

    name = opt["dataset"]
    cls = dataset_register_table.get(name)
    resolve = getattr(cls, "resolve_folder", None)
    if resolve is None:
        raise UserError(f"dataset {name!r}: pre-training reads a processed dataset folder (docs/DATA_LAYOUT.md); "
                        f"use the synthetic dataset or one made by `crslab import-data`")
    return Path(resolve(cls.__new__(cls), opt))


def read_split(folder: Path, split: str) -> list[dict]:
    path = folder / f"{split}_data.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def autocast(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on ``device`` when ``enabled`` (lotcrs_plugin.hardware decides where it pays)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class RecSamples:
    """The samples of 'train', 'valid', 'test' (the dataset folder) and 'simulated' (the balanced
    simulated data of the ``simulation:`` block), cached until the backbone changes (:meth:`clear`)."""

    def __init__(self, model: Any, cfg: FinetuneConfig, opt: Any, entity2id: Mapping[str, int], *, seed: int,
                 dist: Any, device: torch.device):
        self.model, self.cfg, self.opt, self.entity2id = model, cfg, opt, entity2id
        self.seed, self.dist, self.device = seed, dist, device
        self.folder = dataset_folder(opt)
        self._data: dict[str, RecData] = {}

    def dialogs(self, split: str) -> Iterable[dict]:
        """'train' / 'valid' / 'test' from the dataset folder, or 'simulated' (streamed from its cache)."""
        if split != "simulated":
            return read_split(self.folder, split)
        from lotcrs_plugin.data.simulator import iter_simulated, simulate

        sim = simulate(self.folder, self.opt.get("simulation", None), progress=False)
        logger.info(f"[lotcrs] simulated dialogs from {sim}")
        return iter_simulated(sim)

    def data(self, split: str) -> RecData:
        """The recommendation samples of a split, tokenized by the current backbone (cached)."""
        if split not in self._data:
            started = time.perf_counter()
            bb = self.model.backbone
            dialogs = self.dialogs(split)  # simulated: a stream, read once
            table = tokenize_dialogs(dialogs, bb.tokenizer, bb.sep_ids, self.model.items, self.entity2id)
            roles = None  # simulated dialogs: every turn counts as the seeker's for the evidence term
            if split == "simulated":
                index = simulated_index(table)
            else:
                roles = turn_roles(dialogs)
                index = recommendation_index(table, roles)
            if not len(index):
                raise UserError(f"dataset {self.opt['dataset']!r}: the {split} split has no recommendation sample "
                                f"(no Recommender turn names an item after the first turn)")
            evidence = (EvidenceBuilder(table, roles, self.model.items.entity_ids)
                        if self.model.evidence is not None else None)
            self._data[split] = RecData(table, bb.input_format(self.cfg.max_length), bb.first_item_id, index,
                                        self.cfg.pad_to_multiple_of, evidence)
            logger.info(f"[lotcrs] {split}: {table.n_dialogs} dialogs -> {sample_counts(index)} "
                        f"({time.perf_counter() - started:.1f}s)")
        return self._data[split]

    def clear(self) -> None:
        """Forget the tokenized samples (a new backbone object, e.g. the pre-trained one, re-tokenizes)."""
        self._data.clear()

    def batches(self, data: RecData, *, train: bool, batch_size: int | None = None, epoch: int = 0,
                limit: int = 0, micro: list[Any] | None = None) -> torch.utils.data.DataLoader:
        """Shuffled by seed and epoch for training, by length otherwise; micro: only the batches at
        these positions (this process's share, distributed.plan)."""
        size = batch_size or (self.cfg.batch_size if train else self.cfg.eval_batch_size)
        order = IndexBatches(len(data), size, seed=self.seed, epoch=epoch, shuffle=train, lengths=data.lengths(),
                             limit=limit, bucket_pool=self.cfg.bucket_pool if train else 0)
        if micro is not None:
            order = self.dist.shard(order, micro)
        return loader(data, order, num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                      seed=self.seed + epoch)


__all__ = ["RecSamples", "autocast", "dataset_folder", "read_split"]
