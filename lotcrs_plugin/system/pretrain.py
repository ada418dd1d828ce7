"""LOT-CRS pre-training (DMP + CCA) as a CRSLab system: ``model: LOTCRSPretrain``.

    crslab run --config crslab_configs/lotcrs_pretrain_synthetic.yaml

Config: top-level ``backbone`` (bert | bart | unicrs, see lotcrs_plugin.model.backbones) and
``backbone_path`` (a Hugging Face name or local folder; for unicrs a folder with text_encoder/
and decoder/ or a mapping of both), and the block ``lotcrs_pretrain:`` (:class:`PretrainConfig`).

The dialogs come from the dataset's processed folder: the simulated balanced data made from it
(``data: simulated``, lotcrs_plugin.data.simulator, settings from the ``simulation:`` block) or
its training split (``data: train``). Validation and test report the pre-training losses on the
dataset's valid and test splits (ranking metrics belong to fine-tuning).

Files, under ``<root>/save/<run name>/`` (run name: ``run_name``, else
``<dataset>_<backbone>_pretrain``):

- ``checkpoint.pt``: model, optimizer, scheduler, step, epoch, batch within the epoch, RNG
  states, config and item vocabulary; written every ``checkpoint_every`` steps, at each epoch
  end and when training stops. ``resume: true`` continues from it at the same step, with the
  same batches (the order is a function of seed and epoch) and the same random state.
- ``backbone/``: the pre-trained backbone as Hugging Face folders plus lotcrs_backbone.json,
  written when training ends; fine-tuning loads it with
  ``lotcrs_plugin.model.backbones.load_backbone`` (or ``backbone_path:`` pointing at it, which
  is also how CCA starts from a DMP run, as in the paper).
- ``pretrain.json``: a summary (steps, last losses, where the files are).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from lotcrs_plugin import compat
from lotcrs_plugin.config_block import typed_values
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.hardware import bf16_autocast_pays, training_threads

compat.apply()  # crslab is imported only through the patches

import torch  # noqa: E402
from crslab.evaluator.metrics.base import AverageMetric  # noqa: E402
from crslab.system.base import BaseSystem  # noqa: E402
from loguru import logger  # noqa: E402
from torch import nn  # noqa: E402

from lotcrs_plugin.data.pretrain_samples import (  # noqa: E402
    DMP_MODES, ItemVocab, PretrainBatch, PretrainBatchSampler, PretrainData, cca_index, dmp_index, first,
    tokenize_dialogs,
)
from lotcrs_plugin.model.backbones import DEFAULT_PROMPT, POOLINGS, EntityKG, TokenBatch, build_backbone  # noqa: E402
from lotcrs_plugin.model.pretrain_losses import ProjectionHead, info_nce, mask_keywords, masked_lm_loss  # noqa: E402
from lotcrs_plugin.system import distributed  # noqa: E402
from lotcrs_plugin.system.optim import adamw_linear  # noqa: E402

MODEL_NAME = "LOTCRSPretrain"
BLOCK = "lotcrs_pretrain"
STAGE = "pretrain"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "lotcrs-pretrain-checkpoint"
DATA_SOURCES = ("simulated", "train")
SIMILARITIES = ("cosine", "dot")


# ---- the config block ------------------------------------------------------------------------

def _check_projection(value: Any) -> None:
    if not (isinstance(value, bool) or value == "auto"):
        raise UserError(f"key 'projection' must be true, false or auto, not {value!r}")


@dataclass(frozen=True)
class PretrainConfig:
    """The ``lotcrs_pretrain:`` block (defaults from the LOT-CRS paper and authors' code).

    data: dialogs to pre-train on, simulated | train. epochs / max_steps: passes over the data /
    stop after this many optimizer steps (0: no limit; the schedule still spans all epochs).
    lr, weight_decay, warmup_ratio: AdamW and a linear warmup/decay schedule. batch_size: DMP
    samples per micro-batch; cca_batch_size: CCA pairs per micro-batch (0: batch_size);
    grad_accumulation: micro-batches per optimizer step (effective batch 16 x 4 = 64, also over
    several processes: lotcrs_plugin.system.distributed);
    max_grad_norm: clipping (0: off). mlm_probability: chance a keyword span is masked.
    temperature, similarity: InfoNCE. dmp_weight, cca_weight: loss weights (0 turns a task off:
    the paper runs DMP, then CCA from the DMP checkpoint). pooling: the CCA representation, cls |
    mean | first_last ('' = the backbone's default); projection: SimCSE MLP while training,
    true | false | auto (the backbone's default: on for bert). max_length: tokens per input,
    cut from the left. prompt: appended to CCA contexts. dmp_samples: prefixes | dialogs.
    pad_to_multiple_of: dynamic padding granularity. bucket_pool: length-bucketed batches, pools of
    this many batches sorted by length, the batches then shuffled (0 or 1: off, the order of earlier versions;
    lotcrs_plugin.data.length_buckets). num_workers: DataLoader processes. bf16:
    autocast where the device runs it fast (CUDA; a CPU with AVX512_BF16 or AMX), fp32 elsewhere. checkpoint_every: steps between checkpoints (0: epoch ends
    only). resume: continue from the run's checkpoint. run_name: folder under <root>/save.
    tensorboard: scalars under <root>/runs/<run name>. log_every: steps between log lines.
    eval_max_batches: validation/test batches (0: all). seed: -1 uses the top-level seed. threads:
    torch's CPU threads while fit() runs (0: the free cores, lotcrs_plugin.hardware.training_threads).
    """

    data: str = "simulated"
    epochs: int = 2
    max_steps: int = 0
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    batch_size: int = 16
    cca_batch_size: int = 0
    grad_accumulation: int = 4
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.9
    temperature: float = 0.05
    similarity: str = "cosine"
    dmp_weight: float = 1.0
    cca_weight: float = 1.0
    pooling: str = ""
    projection: Any = "auto"
    max_length: int = 128
    prompt: str = DEFAULT_PROMPT
    dmp_samples: str = "prefixes"
    pad_to_multiple_of: int = 8
    # 1.48x pre-training samples/s on INSPIRED (benchmarks/results/speed_cpu.md); off until a validation
    # run shows the same quality with it (the result tables ran with 0)
    bucket_pool: int = 0
    num_workers: int = 0
    bf16: bool = True
    checkpoint_every: int = 500
    resume: bool = False
    run_name: str = ""
    tensorboard: bool = False
    log_every: int = 50
    eval_max_batches: int = 100
    seed: int = -1
    threads: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "PretrainConfig":
        """Validate a block; UserError names an unknown key, a wrong type or a bad value."""
        d = typed_values(cls, d, {"projection": _check_projection})
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise UserError(f"key '{key}' must be {what}, not {getattr(self, key)!r}")

        need(self.data in DATA_SOURCES, "data", " or ".join(DATA_SOURCES))
        need(self.similarity in SIMILARITIES, "similarity", " or ".join(SIMILARITIES))
        need(self.pooling in ("", *POOLINGS), "pooling",
             "one of " + ", ".join(POOLINGS) + " (or '' for the backbone's)")
        need(self.dmp_samples in DMP_MODES, "dmp_samples", " or ".join(DMP_MODES))
        for key in ("epochs", "batch_size", "grad_accumulation", "pad_to_multiple_of"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("max_steps", "cca_batch_size", "num_workers", "checkpoint_every", "eval_max_batches",
                    "bucket_pool", "threads"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.log_every >= 1, "log_every", "at least 1")
        need(self.max_length >= 8, "max_length", "at least 8")
        need(0.0 < self.mlm_probability <= 1.0, "mlm_probability", "in (0, 1]")
        need(self.temperature > 0, "temperature", "positive")
        need(self.lr > 0, "lr", "positive")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        for key in ("weight_decay", "max_grad_norm", "dmp_weight", "cca_weight"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.dmp_weight > 0 or self.cca_weight > 0, "dmp_weight", "positive when cca_weight is 0")
        need(self.seed >= -1, "seed", "-1 (the run's seed) or a non-negative integer")
        if "[MASK]" not in self.prompt:
            raise UserError(f"key 'prompt' must contain [MASK], not {self.prompt!r}")

    @property
    def pairs_per_batch(self) -> int:
        return self.cca_batch_size or self.batch_size


# ---- the model -------------------------------------------------------------------------------

class LOTCRSPretrainModel(nn.Module):
    """The backbone with the catalog's item tokens, plus the CCA projection head (CRSLab model
    ``LOTCRSPretrain``, built as ``Model(opt, device, vocab, side_data)``)."""

    def __init__(self, opt: Any, device: Any, vocab: Mapping[str, Any], side_data: Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg = PretrainConfig.from_dict(opt.get(BLOCK, None))
        name = opt.get("backbone", None)
        path = opt.get("backbone_path", None)
        if not name:
            raise UserError("key 'backbone' is missing; set backbone: bert, bart or unicrs")
        if not path:
            raise UserError("key 'backbone_path' is missing; give a Hugging Face model name or a local folder")
        self.items = ItemVocab.from_side_data(side_data, vocab)
        kg = EntityKG.from_side_data(side_data, vocab["n_entity"]) if (side_data or {}).get("entity_kg") else None
        self.backbone = build_backbone(name, path, kg=kg, prompt=cfg.prompt)
        if self.backbone.n_items:  # a pre-trained export: its items must be this catalog's
            if self.backbone.item_entity_ids and self.backbone.item_entity_ids != self.items.entity_ids:
                raise UserError(f"backbone_path {path}: its item tokens belong to another catalog "
                                f"({self.backbone.n_items} items) than dataset {opt.get('dataset')!r} "
                                f"({len(self.items)} items)")
        else:
            self.backbone.add_item_tokens(self.items.display_names, self.items.entity_ids)
        limit = _max_positions(self.backbone)
        if limit is not None and cfg.max_length > limit:
            raise UserError(f"{BLOCK}.max_length {cfg.max_length} exceeds the backbone's {limit} positions")
        use_projection = self.backbone.default_projection if cfg.projection == "auto" else bool(cfg.projection)
        self.projection = ProjectionHead(self.backbone.hidden_size) if use_projection else None
        self.backbone_name, self.backbone_path = name, path

    def forward(self, batch: PretrainBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The losses of a micro-batch: 'total' (weighted DMP + CCA, with its graph; absent when
        the batch has no task) and its parts, detached. One forward, so that DDP sees the step."""
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        total = None
        if cfg.dmp_weight > 0 and batch.dmp is not None:
            loss, acc = self.dmp(batch.dmp, generator)
            total = cfg.dmp_weight * loss
            out["dmp_loss"], out["dmp_acc"] = loss.detach(), acc
        if cfg.cca_weight > 0 and batch.cca is not None:
            loss, acc = self.cca(batch.cca, batch.cca_targets)
            total = cfg.cca_weight * loss + (total if total is not None else 0)
            out["cca_loss"], out["cca_acc"] = loss.detach(), acc
        if total is not None:
            out["total"] = total
        return out

    def dmp(self, batch: TokenBatch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of domain-adaptive masked prediction on unmasked inputs."""
        bb = self.backbone
        m = mask_keywords(batch.input_ids, batch.keyword_mask, batch.entity_ids > 0,
                          probability=self.cfg.mlm_probability, mask_token_id=bb.mask_token_id,
                          vocab_size=bb.vocab_size, generator=generator)
        # a masked keyword's entity must not reach a KG prompt (unicrs)
        masked = batch.replace(input_ids=m.input_ids, entity_ids=batch.entity_ids.masked_fill(m.selected, 0))
        return masked_lm_loss(bb.encode(masked), m.labels, bb.lm_logits)

    def cca(self, batch: TokenBatch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of contrastive context alignment: rows [0, B) are anchors, [B, 2B)
        their positives."""
        z = self.backbone.context_representation(batch, self.cfg.pooling or None)
        if self.projection is not None and self.training:
            z = self.projection(z)
        anchors, positives = z.chunk(2)
        return info_nce(anchors, positives, self.cfg.temperature, targets, self.cfg.similarity)


def _max_positions(backbone: Any) -> int | None:
    for model in (getattr(backbone, "model", None), getattr(backbone, "decoder", None)):
        cfg = getattr(model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if n:
            return int(n)
    return None


class LOTCRSPretrainDataLoader:
    """CRSLab's get_dataloader slot for ``LOTCRSPretrain``: pre-training reads the raw dialogs of
    the dataset folder (see LOTCRSPretrainSystem), so this only keeps what it is given."""

    def __init__(self, opt: Any, dataset: Any, vocab: Mapping[str, Any]):
        self.opt, self.dataset, self.vocab = opt, dataset, vocab


# ---- the system ------------------------------------------------------------------------------

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


class LOTCRSPretrainSystem(BaseSystem):
    """Pre-trains a LOT-CRS backbone with DMP and CCA (see the module docstring)."""

    def __init__(self, opt, train_dataloader, valid_dataloader, test_dataloader, vocab, side_data,
                 restore_system=False, interact=False, debug=False, tensorboard=False):
        super().__init__(opt, train_dataloader, valid_dataloader, test_dataloader, vocab, side_data,
                         restore_system, interact, debug, tensorboard)
        if isinstance(self.model, nn.DataParallel):  # CRSLab wraps every model on GPU; one device here
            self.model = self.model.module
        self.cfg: PretrainConfig = self.model.cfg
        cfg = self.cfg
        self.seed = cfg.seed if cfg.seed >= 0 else int(opt.get("seed", 42))
        from lotcrs_plugin.paths import active_layout

        layout = active_layout()
        self.run_name = cfg.run_name or f"{opt['dataset']}_{self.model.backbone_name}_pretrain"
        self.run_dir = layout.save / self.run_name
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.use_tensorboard = bool(tensorboard or cfg.tensorboard)
        self.tb_dir = layout.runs / self.run_name
        self.use_dmp, self.use_cca = cfg.dmp_weight > 0, cfg.cca_weight > 0
        self.autocast = cfg.bf16 and bf16_autocast_pays(self.device)
        self.folder = dataset_folder(opt)
        self.entity2id = vocab["entity2id"]
        self._splits: dict[str, PretrainData] = {}
        self.global_step = self.epoch = self.batch_in_epoch = 0
        self.last: dict[str, float] = {}
        self.optimizer = self.scheduler = None
        self._saved_step = -1
        self.dist = distributed.current()  # one process unless torchrun started several
        self.ddp: nn.Module | None = None  # the model in DDP while fit() trains (several processes)

    # -- data

    def train_dialogs(self) -> Iterable[dict]:
        """The dialogs to pre-train on; simulated ones are streamed from their file."""
        if self.cfg.data == "train":
            return read_split(self.folder, "train")
        from lotcrs_plugin.data.simulator import iter_simulated, simulate

        sim = simulate(self.folder, self.opt.get("simulation", None), progress=True)
        logger.info(f"[pretrain] simulated dialogs from {sim}")
        return iter_simulated(sim)

    def data(self, split: str) -> PretrainData:
        """The samples of 'train' (cfg.data's dialogs), 'valid' or 'test' (the dataset's splits)."""
        if split not in self._splits:
            started = time.perf_counter()
            dialogs = self.train_dialogs() if split == "train" else read_split(self.folder, split)
            self._splits[split] = build_data(self.model.backbone, dialogs, self.model.items, self.entity2id, self.cfg)
            d = self._splits[split]
            logger.info(f"[pretrain] {split}: {d.table.n_dialogs} dialogs -> {len(d.dmp)} DMP samples, "
                        f"{len(d.cca.pairable)} pairable CCA contexts ({time.perf_counter() - started:.1f}s; "
                        f"{d.table.stats})")
        return self._splits[split]

    def sampler(self, split: str, epoch: int, start: int = 0, shuffle: bool = True) -> PretrainBatchSampler:
        d = self.data(split)
        pool = self.cfg.bucket_pool if shuffle else 0
        lengths = ({"dmp_lengths": d.dmp_lengths(), "cca_lengths": d.cca_lengths() if d.cca is not None else None}
                   if pool > 1 else {})
        return PretrainBatchSampler(len(d.dmp), d.cca, self.cfg.batch_size, self.cfg.pairs_per_batch,
                                    seed=self.seed, epoch=epoch, start=start, use_dmp=self.use_dmp,
                                    use_cca=self.use_cca, shuffle=shuffle, bucket_pool=pool,
                                    **lengths)

    def loader(self, split: str, sampler: PretrainBatchSampler) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        # its own generator: a DataLoader draws a base seed when iterated, which must not move the
        # global random state (dropout, masking), or a resumed run would diverge
        generator = torch.Generator()
        generator.manual_seed(self.seed + sampler.epoch)
        return torch.utils.data.DataLoader(self.data(split), batch_sampler=sampler, collate_fn=first,
                                           num_workers=workers, pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4 if workers else None, generator=generator)

    # -- one batch

    def step(self, batch: PretrainBatch, stage: str = STAGE, mode: str = "train",
             generator: torch.Generator | None = None, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (detached, on the device); in train mode also the backward
        pass, scaled for gradient accumulation (and by ``scale``: see lotcrs_plugin.system.distributed)."""
        batch = batch.to(self.device, non_blocking=True)
        model = self.ddp if mode == "train" and self.ddp is not None else self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = model(batch, generator)
        total = out.pop("total", None)
        if total is None:
            return out
        out["loss"] = total.detach()
        if mode == "train":
            (total * scale / self.cfg.grad_accumulation).backward()
        return out

    # -- optimisation

    def steps_per_epoch(self) -> int:
        return math.ceil(self.sampler("train", 0).n_batches / self.cfg.grad_accumulation)

    @property
    def last_step(self) -> int:
        """The optimizer step training stops at: max_steps when it cuts the epochs short."""
        return min(self.total_steps, self.cfg.max_steps) if self.cfg.max_steps else self.total_steps

    def build_optim(self) -> None:
        cfg = self.cfg
        total = max(1, self.steps_per_epoch() * cfg.epochs)
        self.optimizer, self.scheduler = adamw_linear(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                      warmup_ratio=cfg.warmup_ratio, total_steps=total,
                                                      fused=self.device.type == "cuda")
        self.total_steps = total

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    # -- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT, "version": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "config": asdict(self.cfg), "seed": self.seed, "run_name": self.run_name,
            "backbone": {"name": self.model.backbone_name, "path": str(self.model.backbone_path),
                         "vocab_size": self.model.backbone.vocab_size},
            "items": {"entity_ids": self.model.items.entity_ids, "names": self.model.items.entity_names},
            "rng": rng,
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoint.pt atomically (a temporary file renamed over the old one); process 0
        only (the others hold the same state)."""
        if not self.dist.is_main:
            return self.checkpoint_path
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
        torch.save(self.checkpoint_state(), tmp)
        os.replace(tmp, self.checkpoint_path)
        self._saved_step = self.global_step
        logger.info(f"[pretrain] checkpoint at step {self.global_step} -> {self.checkpoint_path}")
        return self.checkpoint_path

    def load_checkpoint(self, path: Path | None = None) -> bool:
        """Restore model, optimizer, scheduler, position and RNG state; False if there is none."""
        path = Path(path or self.checkpoint_path)
        if not path.is_file():
            logger.info(f"[pretrain] resume: no checkpoint at {path}; starting from step 0")
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path}: not a LOT-CRS pre-training checkpoint")
        if state["backbone"]["name"] != self.model.backbone_name:
            raise UserError(f"{path}: a '{state['backbone']['name']}' checkpoint; the config says backbone: "
                            f"{self.model.backbone_name} (change run_name, or the backbone)")
        if state["items"]["entity_ids"] != self.model.items.entity_ids:
            raise UserError(f"{path}: its item vocabulary ({len(state['items']['entity_ids'])} items) is not this "
                            f"dataset's ({len(self.model.items)}); change run_name or resume: false")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        logger.info(f"[pretrain] resumed from {path}: step {self.global_step}, epoch {self.epoch}, "
                    f"batch {self.batch_in_epoch}")
        return True

    def export(self) -> Path:
        """The backbone for fine-tuning (Hugging Face folders + lotcrs_backbone.json)."""
        folder = self.model.backbone.save_pretrained(self.run_dir / "backbone")
        summary = {"run_name": self.run_name, "step": self.global_step, "epoch": self.epoch,
                   "backbone": self.model.backbone_name, "backbone_path": str(self.model.backbone_path),
                   "checkpoint": str(self.checkpoint_path), "export": str(folder), "last": self.last,
                   "config": asdict(self.cfg)}
        (self.run_dir / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        logger.info(f"[pretrain] backbone exported to {folder}")
        return folder

    # -- the loops

    def fit(self) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(training_threads(self.cfg.threads))
        try:
            self._fit()
        finally:
            torch.set_num_threads(threads)

    def _fit(self) -> None:
        dist = self.dist
        dist.check_accumulation(self.cfg.grad_accumulation, f"{BLOCK}.grad_accumulation")
        with dist.main_first():  # process 0 simulates the dialogs (a cache), the others read them
            self.data("train")
        self.build_optim()
        if self.cfg.resume:
            self.load_checkpoint()
        writer = None
        if self.use_tensorboard and dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.tb_dir))
        self.ddp = dist.wrap(self.model)
        try:
            self.train_loop(writer)
            self.ddp = None
            if dist.is_main:
                self.evaluate("test", writer)
        finally:
            self.ddp = None
            if writer is not None:
                writer.close()
        if dist.is_main:
            self.export()
        dist.barrier()  # the export exists for every process after fit()

    def train_loop(self, writer: Any = None) -> None:
        from tqdm.auto import tqdm

        cfg, acc, dist = self.cfg, self.cfg.grad_accumulation, self.dist
        processes = f", {dist.world} processes" if dist.active else ""
        if cfg.max_steps and self.global_step >= cfg.max_steps:  # a finished run, resumed: not one step more
            logger.info(f"[pretrain] {self.run_name}: already at max_steps {cfg.max_steps}; nothing to train")
            return
        stops = f" (stops at max_steps {self.last_step})" if self.last_step < self.total_steps else ""
        logger.info(f"[pretrain] {self.run_name}: {self.steps_per_epoch()} steps per epoch, {cfg.epochs} epochs"
                    f"{stops}, effective batch {cfg.batch_size * acc}{processes}, device {self.device}, bf16 autocast "
                    f"{self.autocast}, {torch.get_num_threads()} threads")
        while self.epoch < cfg.epochs:
            sampler = self.sampler("train", self.epoch, start=self.batch_in_epoch)
            n_batches, start = sampler.n_batches, sampler.start
            micro = dist.plan(n_batches, start, acc)  # this process's share (all of it in one process)
            self.model.train()
            sums: dict[str, torch.Tensor] = {}
            n_sum = 0
            # the bar's total is where this epoch really ends (max_steps may stop it early), so its ETA is true
            end = epoch_end(n_batches, start, acc, self.last_step - self.global_step)
            bar = tqdm(total=end, initial=start, desc=f"pretrain epoch {self.epoch}", unit="batch",
                       dynamic_ncols=True, leave=False, disable=not dist.is_main)
            stopped = False
            for mb, batch in zip(micro, self.loader("train", dist.shard(sampler, micro))):
                with dist.sync(self.ddp, mb.last):
                    losses = self.step(batch, STAGE, "train", scale=mb.scale)
                if mb.scale:  # a stand-in (scale 0) is not a sample
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0) + v
                    n_sum += 1
                if not mb.last:
                    continue
                bar.update(mb.end - bar.n)
                self.optimizer_step()
                self.batch_in_epoch = mb.end
                if self.global_step % cfg.log_every == 0 or mb.end == n_batches:
                    sums, n_sum = dist.sum_over_processes({k: float(v) for k, v in sums.items()}, n_sum)
                    self.last = {k: v / max(1, n_sum) for k, v in sums.items()}
                    sums, n_sum = {}, 0
                    self.log_train(writer, bar)
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.max_steps and self.global_step >= cfg.max_steps:
                    stopped = True
                    break
            bar.close()
            if stopped:
                if self._saved_step != self.global_step:
                    self.save_checkpoint()
                logger.info(f"[pretrain] stopped at max_steps {cfg.max_steps}")
                return
            self.epoch += 1
            self.batch_in_epoch = 0
            if dist.is_main:  # process 0 validates; the others wait
                self.evaluate("valid", writer)
            self.save_checkpoint()
            dist.barrier()

    def log_train(self, writer: Any, bar: Any) -> None:
        lr = self.scheduler.get_last_lr()[0]
        text = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.last.items()))
        bar.set_postfix_str(text)
        logger.info(f"[pretrain] step {self.global_step}/{self.last_step} lr {lr:.2e}: {text}")
        if writer is not None:
            for k, v in self.last.items():
                writer.add_scalar(f"train/{k}", v, self.global_step)
            writer.add_scalar("train/lr", lr, self.global_step)

    @torch.no_grad()
    def evaluate(self, split: str, writer: Any = None) -> dict[str, float]:
        """Mean pre-training losses on the dataset's 'valid' or 'test' split (masking drawn from a
        fixed seed, so epochs compare); reported through the CRSLab evaluator."""
        sampler = self.sampler(split, 0, shuffle=False)
        limit = self.cfg.eval_max_batches or sampler.n_batches
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        was_training = self.model.training
        self.model.eval()
        self.evaluator.reset_metrics()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for n, batch in enumerate(self.loader(split, sampler)):
            if n >= limit:
                break
            for k, v in self.step(batch, STAGE, split, generator=generator).items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
                self.evaluator.optim_metrics.add(k, AverageMetric(float(v)))
        result = {k: sums[k] / counts[k] for k in sums}
        mode = "valid" if split == "valid" else "test"
        self.evaluator.report(epoch=self.epoch, mode=mode)
        if writer is not None:
            for k, v in result.items():
                writer.add_scalar(f"{mode}/{k}", v, self.global_step)
        if not result:
            logger.warning(f"[pretrain] {split}: no samples to evaluate")
        self.model.train(was_training)
        return result

    def interact(self) -> None:
        raise UserError("the pre-training system does not converse; fine-tune the backbone first")


def epoch_end(n_batches: int, start: int, accumulation: int, steps_left: int) -> int:
    """The micro-batch position where an epoch of ``n_batches`` that resumes at ``start`` ends
    when at most ``steps_left`` optimizer steps remain (steps hold ``accumulation`` micro-batches
    from position 0 on, as distributed.plan groups them; the epoch's last may be short)."""
    return min(n_batches, (start // accumulation + max(0, steps_left)) * accumulation)


def build_data(backbone: Any, dialogs: Iterable[dict], items: ItemVocab, entity2id: Mapping[str, int],
               cfg: PretrainConfig) -> PretrainData:
    """Samples of ``dialogs`` for ``backbone`` (item tokens already added)."""
    table = tokenize_dialogs(dialogs, backbone.tokenizer, backbone.sep_ids, items, entity2id)
    return PretrainData(table, backbone.input_format(cfg.max_length), backbone.first_item_id,
                        dmp=dmp_index(table, cfg.dmp_samples), cca=cca_index(table),
                        pad_to_multiple_of=cfg.pad_to_multiple_of)
