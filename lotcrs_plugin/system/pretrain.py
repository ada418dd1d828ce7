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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from lotcrs_plugin import compat
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.hardware import bf16_autocast_pays, training_threads

compat.apply()  # crslab is imported only through the patches

import torch  # noqa: E402
from crslab.evaluator.metrics.base import AverageMetric  # noqa: E402
from crslab.system.base import BaseSystem  # noqa: E402
from loguru import logger  # noqa: E402
from torch import nn  # noqa: E402

from lotcrs_plugin.data.item_vocab import ItemVocab  # noqa: E402
from lotcrs_plugin.data.pretrain_samples import (  # noqa: E402
    PretrainBatch, PretrainBatchSampler, PretrainData, cca_index, dmp_index, first,
)
from lotcrs_plugin.data.turns import tokenize_dialogs  # noqa: E402
from lotcrs_plugin.config_blocks.pretrain import BLOCK, PretrainConfig  # noqa: E402
from lotcrs_plugin.model.pretrain import MODEL_NAME  # noqa: E402
from lotcrs_plugin.system import distributed  # noqa: E402
from lotcrs_plugin.system.loop import LossSums, TrainLoop, atomic_save, load_checkpoint_file  # noqa: E402
from lotcrs_plugin.system.samples import dataset_folder, read_split  # noqa: E402

STAGE = "pretrain"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "lotcrs-pretrain-checkpoint"


class LOTCRSPretrainDataLoader:
    """CRSLab's get_dataloader slot for ``LOTCRSPretrain``: pre-training reads the raw dialogs of
    the dataset folder (see LOTCRSPretrainSystem), so this only keeps what it is given."""

    def __init__(self, opt: Any, dataset: Any, vocab: Mapping[str, Any]):
        self.opt, self.dataset, self.vocab = opt, dataset, vocab


# ---- the system ------------------------------------------------------------------------------

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
        self.epoch = self.batch_in_epoch = 0
        self.last: dict[str, float] = {}
        self._saved_step = -1
        self.dist = distributed.current()  # one process unless torchrun started several
        self.loop = TrainLoop(self.model, self.dist, grad_accumulation=cfg.grad_accumulation,
                              max_grad_norm=cfg.max_grad_norm)
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

    def build_optim(self) -> None:
        cfg = self.cfg
        self.loop.build_optim(self.steps_per_epoch() * cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              warmup_ratio=cfg.warmup_ratio, eps=cfg.adam_eps)

    def optimizer_step(self) -> None:
        self.loop.optimizer_step()

    @property
    def last_step(self) -> int:
        """The optimizer step training stops at: max_steps when it cuts the epochs short."""
        total = self.loop.total_steps
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    @property
    def global_step(self) -> int:
        return self.loop.global_step

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule (all epochs)."""
        return self.loop.total_steps

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.loop.optimizer

    # -- checkpoints (the training loop's, lotcrs_plugin.system.loop, with the position in the epoch)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "version": 1, **self.loop.state(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "config": asdict(self.cfg), "seed": self.seed, "run_name": self.run_name,
            "backbone": {"name": self.model.backbone_name, "path": str(self.model.backbone_path),
                         "vocab_size": self.model.backbone.vocab_size},
            "items": {"entity_ids": self.model.items.entity_ids, "names": self.model.items.entity_names},
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoint.pt atomically (a temporary file renamed over the old one); process 0
        only (the others hold the same state)."""
        if not self.dist.is_main:
            return self.checkpoint_path
        atomic_save(self.checkpoint_state(), self.checkpoint_path)
        self._saved_step = self.global_step
        logger.info(f"[pretrain] checkpoint at step {self.global_step} -> {self.checkpoint_path}")
        return self.checkpoint_path

    def load_checkpoint(self, path: Path | None = None) -> bool:
        """Restore model, optimizer, scheduler, position and RNG state; False if there is none."""
        path = Path(path or self.checkpoint_path)
        if not path.is_file():
            logger.info(f"[pretrain] resume: no checkpoint at {path}; starting from step 0")
            return False
        state = load_checkpoint_file(path, CHECKPOINT_FORMAT, "pre-training checkpoint")
        if state["backbone"]["name"] != self.model.backbone_name:
            raise UserError(f"{path}: a '{state['backbone']['name']}' checkpoint; the config says backbone: "
                            f"{self.model.backbone_name} (change run_name, or the backbone)")
        if state["items"]["entity_ids"] != self.model.items.entity_ids:
            raise UserError(f"{path}: its item vocabulary ({len(state['items']['entity_ids'])} items) is not this "
                            f"dataset's ({len(self.model.items)}); change run_name or resume: false")
        self.loop.load_state(state)
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
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
        stops = f" (stops at max_steps {self.last_step})" if self.last_step < self.loop.total_steps else ""
        logger.info(f"[pretrain] {self.run_name}: {self.steps_per_epoch()} steps per epoch, {cfg.epochs} epochs{stops}, "
                    f"effective batch {cfg.batch_size * acc}{processes}, device {self.device}, bf16 autocast {self.autocast}, "
                    f"{torch.get_num_threads()} threads")
        while self.epoch < cfg.epochs:
            sampler = self.sampler("train", self.epoch, start=self.batch_in_epoch)
            n_batches, start = sampler.n_batches, sampler.start
            micro = dist.plan(n_batches, start, acc)  # this process's share (all of it in one process)
            self.model.train()
            sums = LossSums(as_float=False)  # tensors until a log line: no sync per micro-batch
            # the bar's total is where this epoch really ends (max_steps may stop it early), so its ETA is true
            end = epoch_end(n_batches, start, acc, self.last_step - self.global_step)
            bar = tqdm(total=end, initial=start, desc=f"pretrain epoch {self.epoch}", unit="batch",
                       dynamic_ncols=True, leave=False, disable=not dist.is_main)
            stopped = False
            step = (lambda batch, scale: self.step(batch, STAGE, "train", scale=scale))
            for mb in self.loop.steps(micro, self.loader("train", dist.shard(sampler, micro)), step, sums, self.ddp):
                bar.update(mb.end - bar.n)
                self.batch_in_epoch = mb.end
                if self.global_step % cfg.log_every == 0 or mb.end == n_batches:
                    total, n_sum = sums.total(dist, reset=True)
                    self.last = {k: v / max(1, n_sum) for k, v in total.items()}
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
        lr = self.loop.scheduler.get_last_lr()[0]
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


def run_pretraining(opt: Any, backbone_path: Any, overrides: Mapping[str, Any] | None, *, loaders: tuple,
                    vocab: Any, side_data: Any) -> Path:
    """Pre-train as stage 1 of the LOT-CRS pipeline: this system with the fine-tuning config's
    ``lotcrs_pretrain:`` block updated by ``overrides``, from ``backbone_path``; returns the export
    (a finished run is only exported again)."""
    from crslab.config.config import Config

    sub = Config.__new__(Config)
    sub.opt = dict(opt.opt if hasattr(opt, "opt") else opt)
    sub.opt.update(model=MODEL_NAME, model_name=MODEL_NAME, backbone_path=backbone_path)
    sub.opt[BLOCK] = {**(sub.opt.get(BLOCK) or {}), **(overrides or {})}
    logger.info(f"[lotcrs] pre-training ({BLOCK}: {sub.opt[BLOCK]})")
    system = LOTCRSPretrainSystem(sub, *loaders, vocab, side_data)
    with torch.enable_grad():  # also when called from the vote's (no-grad) construction
        system.fit()
    export = system.run_dir / "backbone"
    del system
    return export


def build_data(backbone: Any, dialogs: Iterable[dict], items: ItemVocab, entity2id: Mapping[str, int],
               cfg: PretrainConfig) -> PretrainData:
    """Samples of ``dialogs`` for ``backbone`` (item tokens already added)."""
    table = tokenize_dialogs(dialogs, backbone.tokenizer, backbone.sep_ids, items, entity2id)
    return PretrainData(table, backbone.input_format(cfg.max_length), backbone.first_item_id,
                        dmp=dmp_index(table, cfg.dmp_samples), cca=cca_index(table),
                        pad_to_multiple_of=cfg.pad_to_multiple_of)
