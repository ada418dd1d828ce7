"""LOT-CRS end to end as a CRSLab system: ``model: LOTCRS``.

    crslab run --config crslab_configs/lotcrs_redial.yaml

``fit()`` runs the pipeline of the paper (Zhao et al., RecSys 2023; /work/shared/LOTCRS_NOTES.md):

1. pre-training (``lotcrs.pretrain: true``): :class:`~lotcrs_plugin.system.pretrain.LOTCRSPretrainSystem`
   with the ``lotcrs_pretrain:`` block (DMP + CCA on the balanced simulated data); its export
   replaces the backbone. With ``pretrain: false`` the backbone is ``backbone_path`` as it is: a
   raw model (the "no pre-training" ablation) or the export of an earlier pre-training run
   (``<root>/save/<run>/backbone``: a pre-trained checkpoint);
2. the memory store (``lotcrs.retrieval: true``): one entry per simulated dialog (at most
   ``retrieval.max_per_item`` per item), key = the representation of its context with the target
   masked, value = the backbone's state at the mask, built with the pre-trained backbone; kept
   fixed (``store_refresh: fixed``, the authors') or recomputed with the fine-tuned backbone after
   every epoch (``store_refresh: epoch``);
3. the label-smoothness teacher (``smoothing.teacher: simulated | real``, ``none`` = off): a copy
   of the pre-trained model without retrieval, fine-tuned for ``teacher_epochs`` on the simulated
   dialogs (the paper's description) or on the real training split (the authors' code trains a
   KGSF there); its item distribution for every training sample is computed once and cached
   (TeacherScores) in the run folder;
4. fine-tuning on the real training split: loss = CE + beta * KL(teacher || student)
   (+ ``retrieval.loss_weight`` x the retrieval loss of the query against the store's keys);
   after every epoch the validation split is scored; the model of the best validation epoch
   (``selection:`` block, default hit@1+hit@50) is tested; ``impatience`` epochs without a better
   score stop training;
5. test with the evaluator (``evaluator: longtail``): every metric over all test samples and over
   the subset ``unmentioned`` (targets not named earlier in the dialog).

Recommendation samples (lotcrs_plugin.data.finetune_samples): one per distinct item named in a
Recommender turn, context = the turns before it, the last ``max_length`` tokens with the prompt.

Files under ``<root>/save/<run name>/`` (``lotcrs.run_name``, else ``<dataset>_<backbone>_lotcrs``):
``checkpoint.pt`` (model, optimizer, scheduler, epoch, selection state, RNG; written after every
epoch; ``resume: true`` continues after the last finished epoch), ``best.pt`` (the best validation
epoch's model), ``store/`` (the memory store), ``teacher/`` (cached teacher distributions),
``finetune.json`` (summary). ``crslab run --save-system`` writes the tested model to
``<root>/save/<model_file or LOTCRS.pth>`` and its store beside it (``.store/``);
``--restore-system`` loads both and only tests.

Best-epoch selection keeps the semantics of lotcrs_plugin.system.selection (same block, same
score, ties keep the earlier epoch, test never seen), and stays consistent with its hook when the
runner attaches it: validation runs as ``step(batch, 'rec', 'valid')`` + ``report(mode='valid')``,
test as ``step(batch, 'rec', 'test')``; a resumed run re-reports its best epoch so that the hook
knows it too.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from lotcrs_plugin import compat
from lotcrs_plugin.config_block import typed_values
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.hardware import bf16_autocast_pays, cpu_info

compat.apply()  # crslab is imported only through the patches

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from crslab.evaluator.metrics.base import AverageMetric  # noqa: E402
from crslab.system.base import BaseSystem  # noqa: E402
from loguru import logger  # noqa: E402
from torch import nn  # noqa: E402

from lotcrs_plugin.data.finetune_samples import (  # noqa: E402
    SUBSET_UNMENTIONED, IndexBatches, RecData, loader, per_item_rows, recommendation_index, sample_counts,
    simulated_index, turn_roles,
)
from lotcrs_plugin.data.context_evidence import EvidenceBuilder  # noqa: E402
from lotcrs_plugin.data.pretrain_samples import tokenize_dialogs  # noqa: E402
from lotcrs_plugin.model.backbones import DEFAULT_PROMPT, POOLINGS, load_backbone  # noqa: E402
from lotcrs_plugin.model.fusion import retrieval_contrastive_loss  # noqa: E402
from lotcrs_plugin.model.knn import KnnVoter, context_keys, knn_store  # noqa: E402
from lotcrs_plugin.model.sample_rankers import RANKERS  # noqa: E402
from lotcrs_plugin.model.lotcrs import BLOCK, MODEL_NAME, LOTCRSModel, with_tail_slots  # noqa: E402
from lotcrs_plugin.model.retrieval import MemoryStore  # noqa: E402
from lotcrs_plugin.model.tail_slots import describe, grid_settings  # noqa: E402
from lotcrs_plugin.model.smoothing import SmoothingConfig, TeacherScores, label_smoothness_loss  # noqa: E402
from lotcrs_plugin.system import distributed  # noqa: E402
from lotcrs_plugin.system.optim import adamw_linear  # noqa: E402
from lotcrs_plugin.system.selection import BestEpochSelector, SelectionConfig  # noqa: E402

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CHECKPOINT_FORMAT = "lotcrs-finetune-checkpoint"
SYSTEM_FORMAT = "lotcrs-system"
STORE_REFRESH = ("fixed", "epoch")
TOP_K = 50  # CRSLab's systems rank the top 50


# ---- the config block ------------------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneConfig:
    """The ``lotcrs:`` block (defaults: the paper and the authors' code).

    pretrain: run pre-training first (the ``lotcrs_pretrain:`` block); false: use backbone_path as
    it is (raw model = ablation "no pre-training"; a pre-training export = a pre-trained checkpoint).
    retrieval: memory store + fusion (false: ablation "no retrieval"). store_refresh: fixed (built
    once with the pre-trained backbone) | epoch (recomputed with the fine-tuned one after each epoch).
    epochs, batch_size, grad_accumulation (effective batch = batch_size x grad_accumulation, also over
    several processes: lotcrs_plugin.system.distributed), lr,
    weight_decay, warmup_ratio (linear warmup then linear decay), max_grad_norm (0: no clipping):
    fine-tuning. eval_batch_size: validation, test, store and teacher passes. eval_chunk_elements: the
    most item scores validation and test hold at once (samples x items per chunk; the catalog is
    ranked chunk by chunk, lotcrs_plugin.evaluator.ranking). impatience: stop after
    this many epochs without a better validation score (0: never). max_length: tokens per input, cut
    from the left (the prompt stays). prompt: appended to every context, with [MASK] once.
    pooling: the context representation of store keys and queries ('' = lotcrs_pretrain.pooling,
    else the backbone's default: the space CCA shaped). teacher_epochs, teacher_lr,
    teacher_max_samples (0: all): training of the label-smoothness teacher (teacher_epochs 0 uses the
    pre-trained model as it is). max_train_batches: batches per epoch (0: all; for quick checks). pad_to_multiple_of:
    dynamic padding granularity. num_workers: DataLoader processes. bf16: autocast where the device runs it fast (CUDA; a CPU with
    AVX512_BF16 or AMX: lotcrs_plugin.hardware), fp32 elsewhere.
    resume: continue from the run's checkpoint. run_name: folder under <root>/save. log_every:
    optimizer steps between log lines. seed: -1 uses the top-level seed. threads: torch's intra-op
    CPU threads while fit() runs (0: leave torch's setting; 1 suits tiny models and busy machines,
    where OpenMP threads stall each other). ranker: model (LOT-CRS) | popularity |
    repeat_popularity: training-free baselines on the same samples and evaluator (nothing is
    trained; lotcrs_plugin.model.sample_rankers).
    """

    pretrain: bool = True
    retrieval: bool = True
    store_refresh: str = "fixed"
    epochs: int = 15
    batch_size: int = 8
    grad_accumulation: int = 4
    eval_batch_size: int = 32
    eval_chunk_elements: int = 1 << 24
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    impatience: int = 3
    max_length: int = 256
    prompt: str = DEFAULT_PROMPT
    pooling: str = ""
    teacher_epochs: int = 1
    teacher_lr: float = 5e-5
    teacher_max_samples: int = 0
    max_train_batches: int = 0
    pad_to_multiple_of: int = 8
    num_workers: int = 0
    bf16: bool = True
    resume: bool = False
    run_name: str = ""
    log_every: int = 50
    seed: int = -1
    threads: int = 0
    ranker: str = "model"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FinetuneConfig":
        """Validate a block; UserError names an unknown key, a wrong type or a bad value."""
        d = typed_values(cls, d)
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise UserError(f"key '{key}' must be {what}, not {getattr(self, key)!r}")

        need(self.store_refresh in STORE_REFRESH, "store_refresh", " or ".join(STORE_REFRESH))
        need(self.ranker in RANKERS, "ranker", "one of " + ", ".join(RANKERS))
        need(self.pooling in ("", *POOLINGS), "pooling", "one of " + ", ".join(POOLINGS) + " (or '')")
        for key in ("epochs", "batch_size", "grad_accumulation", "eval_batch_size", "pad_to_multiple_of",
                    "log_every", "eval_chunk_elements"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("impatience", "teacher_epochs", "teacher_max_samples", "max_train_batches", "num_workers",
                    "threads"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.max_length >= 16, "max_length", "at least 16")
        need(self.lr > 0, "lr", "positive")
        need(self.teacher_lr > 0, "teacher_lr", "positive")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        for key in ("weight_decay", "max_grad_norm"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.seed >= -1, "seed", "-1 (the run's seed) or a non-negative integer")
        if self.prompt.count("[MASK]") != 1:
            raise UserError(f"key 'prompt' must contain [MASK] exactly once, not {self.prompt!r}")


# ---- the system ------------------------------------------------------------------------------

def _maximised(key: str, metric: str) -> SelectionConfig:
    """The validation score that ``retrieval.<key>`` names, maximised (UserError names the key)."""
    try:
        return SelectionConfig.from_dict({"metric": metric, "mode": "max"})
    except UserError as err:
        raise UserError(f"retrieval.{key}: {err}") from None


def _dataset_folder(opt: Any) -> Path:
    from lotcrs_plugin.system.pretrain import dataset_folder

    return dataset_folder(opt)


def _read_split(folder: Path, split: str) -> list[dict]:
    from lotcrs_plugin.system.pretrain import read_split

    return read_split(folder, split)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


KNN_SHOWN = ("recall", "tail_recall", "tail_coverage")  # logged per kNN weight while it is chosen


class LOTCRSSystem(BaseSystem):
    """The LOT-CRS pipeline (see the module docstring)."""

    rec_index_space = "position"  # ranks and labels are catalog positions (the long-tail evaluator reads it)

    def __init__(self, opt, train_dataloader, valid_dataloader, test_dataloader, vocab, side_data,
                 restore_system=False, interact=False, debug=False, tensorboard=False):
        super().__init__(opt, train_dataloader, valid_dataloader, test_dataloader, vocab, side_data,
                         restore_system, interact, debug, tensorboard)
        if isinstance(self.model, nn.DataParallel):  # CRSLab wraps every model on GPU; one device here
            self.model = self.model.module
        self.cfg: FinetuneConfig = self.model.cfg
        self.retrieval_cfg = self.model.retrieval_cfg
        try:
            self.smoothing_cfg = SmoothingConfig.from_dict(opt.get("smoothing", None))
            self.selection_cfg = SelectionConfig.from_dict(opt.get("selection", None))
        except UserError as err:
            raise UserError(f"config: {err}") from None
        self.seed = self.cfg.seed if self.cfg.seed >= 0 else int(opt.get("seed", 42))
        from lotcrs_plugin.paths import active_layout

        self.run_name = self.cfg.run_name or f"{opt['dataset']}_{self.model.backbone_name}_lotcrs"
        self.run_dir = active_layout().save / self.run_name
        self.folder = _dataset_folder(opt)
        self.entity2id = vocab["entity2id"]
        self.restored = bool(restore_system)
        self.autocast = self.cfg.bf16 and bf16_autocast_pays(self.device)
        self.teacher: TeacherScores | None = None
        self._data: dict[str, RecData] = {}
        self.store_rows: np.ndarray | None = None  # rows of the simulated data held by the store
        self.epoch = 0             # finished epochs
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.optimizer = self.scheduler = None
        self.pretrained_from: str | None = None
        self._knn_export: Path | None = None  # the export of retrieval.knn_pretrain, once known
        self._knn_pretrain_cfg: Any = None  # lotcrs_pretrain updated by retrieval.knn_pretrain
        self._sync_store_at_test = False
        self.timings: dict[str, float] = {}
        # name -> long-tail test report of a variant of the tested model (e.g. without tail slots)
        self.test_variants: dict[str, Any] = {}
        self.dist = distributed.current()  # one process unless torchrun started several
        self.ddp: nn.Module | None = None  # the model in DDP while fine-tuning (several processes)
        if not interact:
            self.scorer = BestEpochSelector(self, self.selection_cfg)  # never attached: scores only
        self._check_knn_pretrain(opt)
        if self.retrieval_cfg.tail_slots is not None:
            catalog = getattr(self.evaluator, "catalog", None)
            if catalog is None:
                raise UserError("retrieval.tail_slots: needs `evaluator: longtail`, whose longtail: block "
                                "defines the tail items; set it, or tail_slots: null")
            self.model.tail_items = torch.as_tensor(np.asarray(catalog.is_tail, dtype=bool))

    def _check_knn_pretrain(self, opt: Any) -> None:
        over = self.retrieval_cfg.knn_pretrain
        if not over:
            return
        from lotcrs_plugin.system import pretrain as pt

        block = dict(opt.get(pt.BLOCK, None) or {})
        own = block.get("run_name") or f"{opt['dataset']}_{self.model.backbone_name}_pretrain"
        if over["run_name"] == own:
            raise UserError(f"retrieval.knn_pretrain.run_name: '{own}' is this run's own pre-training "
                            f"(lotcrs_pretrain.run_name); give the vote's encoder another run name")
        try:
            self._knn_pretrain_cfg = pt.PretrainConfig.from_dict({**block, **over})
        except UserError as err:
            raise UserError(f"retrieval.knn_pretrain: {err}") from None

    # -- data

    def dialogs(self, split: str) -> Iterable[dict]:
        """'train' / 'valid' / 'test' from the dataset folder, or 'simulated' (the balanced
        simulated data of the ``simulation:`` block, streamed from its cache)."""
        if split != "simulated":
            return _read_split(self.folder, split)
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

    def batches(self, data: RecData, *, train: bool, batch_size: int | None = None, epoch: int = 0,
                limit: int = 0, micro: list[distributed.MicroBatch] | None = None) -> torch.utils.data.DataLoader:
        """micro: only the batches at these positions (this process's share, distributed.plan)."""
        size = batch_size or (self.cfg.batch_size if train else self.cfg.eval_batch_size)
        order = IndexBatches(len(data), size, seed=self.seed, epoch=epoch, shuffle=train,
                             lengths=None if train else data.lengths(), limit=limit)
        if micro is not None:
            order = self.dist.shard(order, micro)
        return loader(data, order, num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                      seed=self.seed + epoch)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # -- 1. pre-training

    def _pretraining(self, overrides: Mapping[str, Any] | None = None) -> Path:
        """Run the pre-training system with this config's ``lotcrs_pretrain:`` block (updated by
        ``overrides``) and return its export (a finished run is only exported again)."""
        from crslab.config.config import Config

        from lotcrs_plugin.system import pretrain as pt

        sub = Config.__new__(Config)
        sub.opt = dict(self.opt.opt if hasattr(self.opt, "opt") else self.opt)
        sub.opt.update(model=pt.MODEL_NAME, model_name=pt.MODEL_NAME, backbone_path=self.model.backbone_path)
        sub.opt[pt.BLOCK] = {**(sub.opt.get(pt.BLOCK) or {}), **(overrides or {})}
        logger.info(f"[lotcrs] pre-training ({pt.BLOCK}: {sub.opt[pt.BLOCK]})")
        system = pt.LOTCRSPretrainSystem(sub, self.train_dataloader, self.valid_dataloader, self.test_dataloader,
                                         self.vocab, self.side_data)
        with torch.enable_grad():  # also when called from the vote's (no-grad) construction
            system.fit()
        export = system.run_dir / "backbone"
        del system
        return export

    def pretrain(self) -> Path:
        """Pre-train (step 1 of 4) and load the export as the backbone."""
        started = time.perf_counter()
        logger.info("[lotcrs] 1/4 pre-training")
        export = self._pretraining()
        self.model.set_backbone(load_backbone(export, kg=self.model.kg, expect=self.model.backbone_name,
                                              prompt=self.cfg.prompt))
        self._data.clear()  # tokenized by the old backbone object
        self.pretrained_from = str(export)
        self.timings["pretrain_s"] = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] pre-trained backbone loaded from {export}")
        return export

    # -- 2. the memory store

    @torch.no_grad()
    def encode_store_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of the simulated samples ``rows`` with the current backbone."""
        sim = self.data("simulated")
        part = sim.subset(rows)
        was = self.model.training
        self.model.eval()
        keys = values = None
        for batch in self.batches(part, train=False):
            batch = batch.to(self.device)
            with self._autocast():
                k, v = self.model.store_entries(batch.tokens)
            if keys is None:
                keys = np.empty((len(part), k.shape[1]), np.float32)
                values = np.empty((len(part), v.shape[1]), np.float32)
            idx = batch.sample_idx.cpu().numpy()
            keys[idx], values[idx] = k.float().cpu().numpy(), v.float().cpu().numpy()
        self.model.train(was)
        return keys, values

    def build_store(self) -> MemoryStore:
        started = time.perf_counter()
        cfg = self.retrieval_cfg
        sim = self.data("simulated")
        rows = per_item_rows(sim.index.targets, cfg.max_per_item, cfg.sample_seed)
        keys, values = self.encode_store_rows(rows)
        store = MemoryStore.build(keys, values, sim.index.targets[rows], cfg)
        self.store_rows = rows[store.entry_ids]  # entry i of the store is simulated sample store_rows[i]
        self.model.store = store
        self.timings["store_s"] = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] 2/4 memory store: {len(store)} entries for {len(store.unique_items)} items "
                    f"({cfg.index} index, top-{cfg.top_k}, {self.timings['store_s']}s)")
        return store

    def refresh_store(self) -> None:
        """Recompute the store's keys and values with the current backbone (same entries)."""
        keys, values = self.encode_store_rows(self.store_rows)
        self.model.store.refresh(keys, values)

    def save_store(self, folder: Path) -> None:
        self.model.store.save(folder)
        np.save(folder / "simulated_rows.npy", self.store_rows)

    def load_store(self, folder: Path) -> None:
        self.model.store = MemoryStore.load(folder)
        rows = folder / "simulated_rows.npy"
        self.store_rows = np.load(rows) if rows.is_file() else None

    # -- 2b. the kNN vote of the balanced store (evaluation only; lotcrs_plugin/model/knn.py)

    def knn_source(self) -> str:
        """Where the frozen kNN encoder comes from: the export of ``retrieval.knn_pretrain`` (its
        own pre-training, run here when it has not finished; the random state is kept, so that
        fine-tuning does not depend on it), else the run's pre-trained export, else backbone_path."""
        over = self.retrieval_cfg.knn_pretrain
        if not over:
            return self.pretrained_from or str(self.model.backbone_path)
        if self._knn_export is None:
            self._knn_export = self._finished_pretraining(over)
        if self._knn_export is None:
            state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            try:
                self._knn_export = self._pretraining(over)
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])
                torch.set_rng_state(state[2])
        return str(self._knn_export)

    def _finished_pretraining(self, overrides: Mapping[str, Any]) -> Path | None:
        """The export of a finished pre-training run with exactly this configuration, else None."""
        from lotcrs_plugin.paths import active_layout

        want = asdict(self._knn_pretrain_cfg)  # lotcrs_pretrain updated by the overrides (checked at start)
        summary = active_layout().save / overrides["run_name"] / "pretrain.json"
        try:
            done = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        same = json.loads(json.dumps(done.get("config"), default=str)) == json.loads(json.dumps(want, default=str))
        export = Path(done.get("export", ""))
        if same and done.get("backbone_path") == str(self.model.backbone_path) and (export / "config.json").is_file():
            logger.info(f"[lotcrs] kNN encoder: the finished pre-training {export}")
            return export
        return None

    def knn_encoder(self, source: str) -> Any:
        from lotcrs_plugin.model.backbones import build_backbone

        model = self.model.module if isinstance(self.model, nn.DataParallel) else self.model
        bb = build_backbone(model.backbone_name, source, kg=model.kg, prompt=model.cfg.prompt)
        return model._prepare(bb).to(self.device)

    @torch.no_grad()
    def build_knn(self) -> KnnVoter:
        """Keys of the simulated contexts by a frozen encoder: the backbone as fine-tuning starts
        from it (the pre-trained export, else backbone_path; also after a resume), loaded afresh.
        Saved in the run folder (the encoder is rebuilt from its source, not copied)."""
        started = time.perf_counter()
        cfg = self.retrieval_cfg
        source = self.knn_source()
        encoder = self.knn_encoder(source).eval()
        sim = self.data("simulated")
        rows = per_item_rows(sim.index.targets, cfg.knn_per_item, cfg.sample_seed)
        part = sim.subset(rows)
        keys = np.empty((len(part), self.model.backbone.hidden_size), np.float32)
        for batch in self.batches(part, train=False):
            batch = batch.to(self.device)
            with self._autocast():
                keys[batch.sample_idx.cpu().numpy()] = context_keys(encoder, batch.tokens, cfg.knn_pooling).cpu().numpy()
        voter = KnnVoter(encoder, knn_store(keys, sim.index.targets[rows], cfg), len(self.model.items),
                         k=cfg.knn_k, temperature=cfg.knn_temperature, pooling=cfg.knn_pooling,
                         weight=0.0 if cfg.knn_weight == "auto" else float(cfg.knn_weight), source=source,
                         tail_slots=None if cfg.tail_slots in (None, "auto") else cfg.tail_slots)
        self.model.knn = voter
        voter.save(self.run_dir / "knn")
        self.timings["knn_s"] = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] kNN vote: {len(voter.store)} simulated contexts of {len(voter.store.unique_items)} "
                    f"items, k {voter.k}, weight {cfg.knn_weight} ({self.timings['knn_s']}s)")
        return voter

    def load_knn(self, folder: Path) -> KnnVoter:
        manifest = KnnVoter.read_manifest(folder)
        model = self.model.module if isinstance(self.model, nn.DataParallel) else self.model
        voter = KnnVoter(self.knn_encoder(manifest["source"]), MemoryStore.load(folder), len(model.items),
                         k=manifest["k"], temperature=manifest["temperature"], pooling=manifest["pooling"],
                         weight=manifest["weight"], source=manifest["source"],
                         tail_slots=manifest.get("tail_slots"))
        model.knn = voter
        return voter

    @torch.no_grad()
    def choose_knn_weight(self) -> None:
        """knn_weight: auto -> the grid value with the best validation selection score (ties: the
        smaller weight). Never looks at the test split."""
        voter, cfg = self.model.knn, self.retrieval_cfg
        if voter is None or cfg.knn_weight != "auto":
            return
        selection = _maximised("knn_metric", cfg.knn_metric) if cfg.knn_metric else self.selection_cfg
        was = self.model.training
        self.model.eval()
        voter.weight = max(cfg.knn_grid)  # > 0 unless the grid is all 0: the votes are computed once
        parts = self._valid_score_parts(tail=None)
        scores: dict[float, float | None] = {}
        for weight in sorted(cfg.knn_grid):
            voter.weight = weight

            def feed() -> None:
                for scored, targets, unmentioned in parts:
                    with self._autocast():
                        ranking, tail_top = self.model.rank_scored(scored, targets, TOP_K,
                                                                   self.cfg.eval_chunk_elements)
                    if tail_top is not None:
                        ranking = with_tail_slots(ranking, tail_top, voter.tail_slots, targets)
                    self._evaluate_ranking(ranking, targets, unmentioned)

            scores[weight] = self._validation_scores(feed, selection)[0]
            report = getattr(self.evaluator, "last_report", None) or {}
            shown = {k: v for k, v in report.get("metrics", {}).items() if k.split("@")[0] in KNN_SHOWN}
            logger.info(f"[lotcrs] kNN weight {weight:g} on validation: score "
                        f"{'n/a' if scores[weight] is None else f'{scores[weight]:.4f}'}; "
                        + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if v is not None))
        self.evaluator.reset_metrics()
        self.model.train(was)
        defined = {w: v for w, v in scores.items() if v is not None}
        sign = 1 if selection.mode == "max" else -1
        best = max(defined, key=lambda w: (sign * defined[w], -w)) if defined else 0.0
        voter.weight = best
        self.knn_selection = {"metric": selection.metric, "scores": scores, "weight": best}
        logger.info(f"[lotcrs] kNN weight chosen on validation ({selection.metric}): {best} of "
                    + ", ".join(f"{w:g}: {'n/a' if v is None else f'{v:.4f}'}" for w, v in scores.items()))

    def _validation_scores(self, feed: Any, *selections: SelectionConfig) -> list[float | None]:
        """Reset the evaluator, let ``feed()`` give it validation lists, and read each selection
        score off the report."""
        self.evaluator.reset_metrics()
        feed()
        if hasattr(self.evaluator, "longtail_report"):
            self.evaluator.last_report = self.evaluator.longtail_report(-1, "valid")
        return [BestEpochSelector(self, sel).score() for sel in selections]

    @torch.no_grad()
    def _valid_score_parts(self, tail: bool | None) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """(score parts, targets, unmentioned) of every validation batch: the model and the vote
        run once, the weights and slots under choice are applied to them (model.rank_scored)."""
        out = []
        for batch in self.batches(self.data("valid"), train=False):
            batch = batch.to(self.device)
            with self._autocast():
                out.append((self.model.score_parts(batch.tokens, tail=tail, evidence=batch.evidence), batch.targets,
                            ~batch.mentioned))
        return out

    @torch.no_grad()
    def choose_tail_slots(self) -> None:
        """tail_slots: auto -> of ``tail_slots_grid``, the setting with the best validation
        ``tail_slots_metric`` among those that keep ``tail_slots_keep`` at least at its value
        without slots (ties: fewer slots). One scoring pass over validation: the model's lists and
        the vote's tail lists are merged for every setting. Never looks at the test split."""
        voter, cfg = self.model.knn, self.retrieval_cfg
        if voter is None or cfg.tail_slots != "auto":
            return
        selection = _maximised("tail_slots_metric", cfg.tail_slots_metric)
        keep = _maximised("tail_slots_keep", cfg.tail_slots_keep) if cfg.tail_slots_keep else None
        was = self.model.training
        self.model.eval()
        parts = []
        for scored, targets, unmentioned in self._valid_score_parts(tail=True):
            with self._autocast():
                ranking, tail_top = self.model.rank_scored(scored, targets, TOP_K, self.cfg.eval_chunk_elements)
            parts.append((ranking, tail_top, targets, unmentioned))

        def score(setting: dict[int, int] | None) -> tuple[float | None, float | None]:
            def feed() -> None:
                for ranking, tail_top, targets, unmentioned in parts:
                    listed = with_tail_slots(ranking, tail_top, setting, targets)
                    self._evaluate_lists(listed.top_ids.cpu(), targets.cpu(), unmentioned.cpu())

            value, *kept = self._validation_scores(feed, selection, *([keep] if keep is not None else []))
            return value, kept[0] if kept else None

        without = score(None)
        floor = without[1]
        scores: dict[str, dict[str, Any]] = {}
        best, best_score = None, None
        for setting in grid_settings(cfg.tail_slots_grid):
            value, kept = score(setting) if any(setting.values()) else without  # all zero: the lists without slots
            allowed = keep is None or (kept is not None and floor is not None and kept >= floor - 1e-9)
            scores[describe(setting)] = {"slots": setting, "score": value, "keep": kept, "allowed": allowed}
            logger.info(f"[lotcrs] tail slots {describe(setting)} on validation: {selection.metric} "
                        f"{'n/a' if value is None else f'{value:.4f}'}"
                        + (f", {keep.metric} {kept:.4f} ({'kept' if allowed else 'lowered'})"
                           if keep is not None and kept is not None else ""))
            if allowed and value is not None and (best_score is None or value > best_score + 1e-12):
                best, best_score = setting, value
        self.evaluator.reset_metrics()
        self.model.train(was)
        voter.tail_slots = {c: n for c, n in best.items()} if best and any(best.values()) else None
        self.tail_slots_selection = {"metric": selection.metric, "keep": keep.metric if keep else "",
                                     "keep_without_slots": floor, "scores": scores, "slots": voter.tail_slots}
        logger.info(f"[lotcrs] tail slots chosen on validation: {describe(voter.tail_slots)}"
                    + (f" ({keep.metric} without slots {floor:.4f})" if keep is not None and floor is not None else ""))

    # -- 3. the label-smoothness teacher

    def teacher_scores(self) -> TeacherScores:
        """The teacher's item distribution for every training sample (cached in the run folder)."""
        sm, cfg = self.smoothing_cfg, self.cfg
        train = self.data("train")
        cache = self.run_dir / "teacher"  # reused by a resumed run; delete it to train the teacher again
        if cfg.resume and (cache / "manifest.json").is_file():
            scores = TeacherScores.load(cache, expect_kind=sm.teacher)
            if len(scores) == len(train):
                logger.info(f"[lotcrs] 3/4 teacher scores loaded from {cache}")
                return scores
        started = time.perf_counter()
        teacher = self.model.teacher_copy().to(self.device)
        source = self.data("simulated" if sm.teacher == "simulated" else "train")
        rows = np.arange(len(source))
        if cfg.teacher_max_samples and len(rows) > cfg.teacher_max_samples:
            rows = np.sort(np.random.default_rng(self.seed).choice(len(rows), cfg.teacher_max_samples, replace=False))
        part = source.subset(rows)
        # the head and the evidence term at their own rates, as in fine-tuning; a constant rate (no schedule)
        optimizer, _ = adamw_linear(teacher, lr=cfg.teacher_lr, weight_decay=cfg.weight_decay, warmup_ratio=0.0,
                                    total_steps=1, rates=teacher.parameter_rates())
        teacher.train()

        def teacher_step() -> None:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(teacher.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        n = 0
        for epoch in range(cfg.teacher_epochs):
            for batch in self.batches(part, train=True, epoch=10_000 + epoch):
                batch = batch.to(self.device)
                with self._autocast():
                    logits = teacher(batch.tokens, evidence=batch.evidence).logits
                loss = F.cross_entropy(logits.float(), batch.targets)
                (loss / cfg.grad_accumulation).backward()
                n += 1
                if n % cfg.grad_accumulation == 0:
                    teacher_step()
        if n % cfg.grad_accumulation:
            teacher_step()
        teacher.eval()

        def logits_of_train() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            with torch.no_grad():
                for batch in self.batches(train, train=False):
                    batch = batch.to(self.device)
                    with self._autocast():
                        yield batch.sample_idx, teacher(batch.tokens, evidence=batch.evidence).logits.float()

        scores = TeacherScores.collect(logits_of_train(), len(train), kind=sm.teacher, temperature=sm.temperature,
                                       top_k=sm.top_k)
        del teacher, optimizer
        scores.save(cache)
        self.timings["teacher_s"] = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] 3/4 teacher trained on {len(part)} {sm.teacher} samples for {cfg.teacher_epochs} "
                    f"epoch(s); distributions of {len(train)} training samples cached in {cache} "
                    f"({self.timings['teacher_s']}s)")
        return scores

    # -- 4. fine-tuning

    @property
    def retrieval_loss_on(self) -> bool:
        return self.model.uses_retrieval and self.retrieval_cfg.loss_weight > 0

    def train_batches(self) -> int:
        """Micro-batches per fine-tuning epoch (of all processes together)."""
        batches = math.ceil(len(self.data("train")) / self.cfg.batch_size)
        if self.cfg.max_train_batches:
            batches = min(batches, self.cfg.max_train_batches)
        return batches

    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_batches() / self.cfg.grad_accumulation)

    def build_optim(self) -> None:
        cfg = self.cfg
        total = max(1, self.steps_per_epoch() * cfg.epochs)
        self.optimizer, self.scheduler = adamw_linear(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                      warmup_ratio=cfg.warmup_ratio, total_steps=total,
                                                      rates=self.model.parameter_rates())
        self.total_steps = total

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def step(self, batch, stage, mode, *, scale: float = 1.0):
        """Train: the loss of one micro-batch, backpropagated (scaled for accumulation, and by
        ``scale``: see lotcrs_plugin.system.distributed); returns its parts. Valid/test: item
        scores to the evaluator (all samples, and the subset ``unmentioned``) and the
        cross-entropy as ``rec_loss``."""
        batch = batch.to(self.device, non_blocking=True)
        if mode == "train":
            return self._train_step(batch, scale)
        if mode == "test" and self._sync_store_at_test:
            # the model may just have been replaced by the best epoch's (selection hook): its store
            self._sync_store_at_test = False
            self.refresh_store()
        targets = batch.targets
        with torch.no_grad(), self._autocast():
            # item chunks of at most eval_chunk_elements scores: no (B, N) matrix for large catalogs
            ranking = self.model.rank_items(batch.tokens, targets, TOP_K, self.cfg.eval_chunk_elements,
                                            evidence=batch.evidence)
        ce = self._evaluate_ranking(ranking, targets, ~batch.mentioned)
        return {"rec_loss": ce.detach() / len(batch)}

    def _evaluate_ranking(self, ranking: Any, targets: torch.Tensor, unmentioned: torch.Tensor) -> torch.Tensor:
        """A batch's ranking to the evaluator (its lists, and the cross-entropy as rec_loss)."""
        ce = ranking.cross_entropy("sum")
        self.evaluator.optim_metrics.add("rec_loss", AverageMetric(float(ce), int(targets.shape[0])))
        self._evaluate_lists(ranking.top_ids.cpu(), targets.cpu(), unmentioned.cpu())
        return ce

    def _evaluate_lists(self, ranks: torch.Tensor, labels: torch.Tensor, unmentioned: torch.Tensor) -> None:
        """Top lists to the evaluator: all samples, and the subset ``unmentioned``."""
        if hasattr(self.evaluator, "rec_evaluate_batch"):
            self.evaluator.rec_evaluate_batch(ranks, labels, subsets={SUBSET_UNMENTIONED: unmentioned})
        else:  # CRSLab's own evaluators take one sample at a time
            for r, y in zip(ranks.tolist(), labels.tolist()):
                self.evaluator.rec_evaluate(r, y)

    def _train_step(self, batch, scale: float = 1.0) -> dict[str, torch.Tensor]:
        model = self.ddp if self.ddp is not None else self.model
        with self._autocast():
            out = model(batch.tokens, evidence=batch.evidence, need_query=self.retrieval_loss_on)
        teacher = self.teacher.lookup(batch.sample_idx, self.device) if self.teacher is not None else None
        parts = label_smoothness_loss(out.logits.float(), batch.targets, teacher, self.smoothing_cfg.beta)
        total = parts.total
        losses = {"ce": parts.ce.detach(), "kl": parts.kl.detach()}
        if self.retrieval_loss_on:
            r = self.retrieval_cfg
            rl = retrieval_contrastive_loss(out.query.float(), self.model.store, batch.targets, r.n_pos, r.n_neg,
                                            r.temperature)
            total = total + r.loss_weight * rl
            losses["retrieval"] = rl.detach()
        (total * scale / self.cfg.grad_accumulation).backward()
        losses["loss"] = total.detach()
        return losses

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        train = self.data("train")
        self.model.train()
        sums: dict[str, float] = {}
        n = 0
        dist = self.dist
        micro = dist.plan(self.train_batches(), 0, cfg.grad_accumulation)  # this process's share (all in one)
        batches = self.batches(train, train=True, epoch=self.epoch, limit=cfg.max_train_batches, micro=micro)
        for mb, batch in zip(micro, batches):
            with dist.sync(self.ddp, mb.last):
                parts = self.step(batch, "rec", "train", scale=mb.scale)
            if mb.scale:  # a stand-in (scale 0) is not a sample
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
            if mb.last:
                self.optimizer_step()
                if self.global_step % cfg.log_every == 0:
                    seen, count = dist.sum_over_processes(sums, n)
                    logger.info(f"[lotcrs] step {self.global_step}/{self.total_steps}: "
                                + ", ".join(f"{k} {v / max(1, count):.4f}" for k, v in sorted(seen.items())))
        sums, n = dist.sum_over_processes(sums, n)
        return {k: v / max(1, n) for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, split: str, epoch: int = -1) -> None:
        """Score a split through step(..., 'rec', mode) and report it ('valid' or 'test')."""
        mode = "test" if split == "test" else "valid"
        was = self.model.training
        self.model.eval()
        self.evaluator.reset_metrics()
        for batch in self.batches(self.data(split), train=False):
            self.step(batch, "rec", mode)
        self.evaluator.report(epoch=epoch, mode=mode)
        self.model.train(was)

    def validate(self, epoch: int) -> float | None:
        """The selection score on validation: process 0 scores it, every process receives it (the
        same best epoch and early stop everywhere)."""
        score = None
        if self.dist.is_main:
            self.evaluate("valid", epoch)
            score = self.scorer.score()
        return self.dist.broadcast(score)

    def observe(self, epoch: int, score: float | None, train_losses: Mapping[str, float]) -> None:
        """Keep the best validation epoch (ties keep the earlier one) and count bad epochs."""
        self.history.append({"epoch": epoch, "score": score, "train": dict(train_losses)})
        mode = self.selection_cfg.mode
        better = score is not None and (self.best_score is None or (score > self.best_score if mode == "max"
                                                                     else score < self.best_score))
        if better:
            self.best_epoch, self.best_score, self.bad_epochs = epoch, score, 0
            if self.dist.is_main:  # process 0 alone tests and writes files
                self.best_state = _cpu_state(self.model)
                _atomic_save({"epoch": epoch, "score": score, "model": self.best_state}, self.run_dir / BEST)
        else:
            self.bad_epochs += 1
        best = "n/a" if self.best_score is None else f"{self.best_score:.4f}"
        logger.info(f"[lotcrs] epoch {epoch}: validation {self.selection_cfg.metric} = "
                    f"{'undefined' if score is None else f'{score:.4f}'}; best epoch {self.best_epoch} ({best})")

    def finetune(self) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        logger.info(f"[lotcrs] 4/4 fine-tuning: {len(self.data('train'))} training samples, {self.steps_per_epoch()} "
                    f"steps per epoch, {cfg.epochs} epochs, effective batch {cfg.batch_size * cfg.grad_accumulation}, "
                    f"retrieval {'on' if self.model.uses_retrieval else 'off'}"
                    f"{' + loss' if self.retrieval_loss_on else ''}, label smoothness "
                    f"{'on (' + self.smoothing_cfg.teacher + ' teacher)' if self.teacher is not None else 'off'}"
                    f"{f', {self.dist.world} processes' if self.dist.active else ''}")
        self.ddp = self.dist.wrap(self.model)  # None in one process
        while self.epoch < cfg.epochs and not self.stopped:
            losses = self.train_epoch()
            epoch = self.epoch
            self.epoch += 1
            if self.model.uses_retrieval and cfg.store_refresh == "epoch":
                self.refresh_store()
            self.observe(epoch, self.validate(epoch), losses)
            if cfg.impatience and self.bad_epochs >= cfg.impatience:
                self.stopped = True
                logger.info(f"[lotcrs] early stop: {self.bad_epochs} epochs without a better validation score")
            self.save_checkpoint()
        self.ddp = None
        self.timings["finetune_s"] = round(time.perf_counter() - started, 2)

    # -- 5. test

    def test(self) -> None:
        """Test the best validation epoch's model (the last one when selection is off or no
        epoch had a defined score)."""
        if self.selection_cfg.enabled and self.best_epoch is not None:
            state = self.best_state
            if state is None and (self.run_dir / BEST).is_file():
                state = torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)["model"]
            if state is not None:
                self.model.load_state_dict(state)
                logger.info(f"[lotcrs] testing the model of epoch {self.best_epoch} (validation "
                            f"{self.selection_cfg.metric} = {self.best_score:.4f}); "
                            f"the last epoch was {self.epoch - 1}")
        self._sync_store_at_test = (self.model.uses_retrieval and self.cfg.store_refresh == "epoch"
                                    and not self.restored)
        if self.model.knn is not None and not self.restored:
            if self._sync_store_at_test:  # the validation passes below must see the tested model's store
                self._sync_store_at_test = False
                self.refresh_store()
            self.choose_knn_weight()
            self.choose_tail_slots()
        self.evaluate("test")
        self._sync_store_at_test = False
        voter = self.model.knn
        if voter is not None and voter.tail_slots and any(voter.tail_slots.values()):
            # the same model's test lists without the tail slots: what the model itself ranks
            slots, voter.tail_slots = voter.tail_slots, None
            try:
                self.test_variants["without_tail_slots"] = self._quiet_report("test")
            finally:
                voter.tail_slots = slots

    @torch.no_grad()
    def _quiet_report(self, split: str) -> dict[str, Any] | None:
        """The long-tail report of ``split`` as it is scored now, kept out of the run's reports."""
        if not hasattr(self.evaluator, "longtail_report"):
            return None
        was = self.model.training
        self.model.eval()
        self.evaluator.reset_metrics()
        for batch in self.batches(self.data(split), train=False):
            self.step(batch, "rec", "test")
        report = self.evaluator.longtail_report(-1, split)
        self.evaluator.reset_metrics()
        self.model.train(was)
        return report

    # -- the whole pipeline

    def fit(self) -> None:
        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            self._fit()
        finally:
            torch.set_num_threads(threads)

    def _fit(self) -> None:
        started = time.perf_counter()
        dist = self.dist
        logger.info(f"[lotcrs] device {self.device}, CPU {cpu_info().describe()}, {torch.get_num_threads()} threads, "
                    f"bf16 autocast {self.autocast}")
        if self.restored:
            logger.info(f"[lotcrs] restored system from {self.model_file}: testing it")
            if dist.is_main:
                self.test()
            dist.barrier()
            return
        if self.model.ranker is not None:  # a training-free baseline: nothing to train or select
            logger.info(f"[lotcrs] ranker {self.cfg.ranker}: no training; testing it")
            if dist.is_main:
                self.evaluate("test")
                self.timings["total_s"] = round(time.perf_counter() - started, 2)
                self.write_summary()
            dist.barrier()
            return
        dist.check_accumulation(self.cfg.grad_accumulation, f"{BLOCK}.grad_accumulation")
        resumed = False
        if self.cfg.resume:
            self.build_optim()
            resumed = self.load_checkpoint()
        if not resumed:
            if self.cfg.pretrain:
                self.pretrain()
            if self.model.fusion is not None:
                if dist.is_main:  # process 0 builds the store; the others load what it saved
                    self.build_store()
                    self.save_store(self.run_dir / "store")
                dist.barrier()
                if not dist.is_main:
                    self.load_store(self.run_dir / "store")
            if self.retrieval_cfg.knn_on and dist.is_main:  # only process 0 tests: the vote is its own
                self.build_knn()
        elif self.retrieval_cfg.knn_on and dist.is_main:
            manifest = self.run_dir / "knn" / "knn.json"
            if manifest.is_file() and KnnVoter.read_manifest(manifest.parent)["source"] == self.knn_source():
                self.load_knn(self.run_dir / "knn")
            else:  # a run trained without the vote, or a vote of another encoder: built now
                self.build_knn()
        if self.smoothing_cfg.enabled:
            if dist.is_main:  # process 0 trains the teacher and caches its scores; the others load them
                self.teacher = self.teacher_scores()
            dist.barrier()
            if not dist.is_main:
                self.teacher = TeacherScores.load(self.run_dir / "teacher", expect_kind=self.smoothing_cfg.teacher)
        if not resumed:
            self.build_optim()
        elif dist.is_main:
            self._report_best_again()
        self.finetune()
        if dist.is_main:  # process 0 tests and writes the summary
            self.test()
            self.timings["total_s"] = round(time.perf_counter() - started, 2)
            self.write_summary()
        dist.barrier()

    # -- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT, "version": 1,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.global_step,
            "best_epoch": self.best_epoch, "best_score": self.best_score, "bad_epochs": self.bad_epochs,
            "stopped": self.stopped, "history": self.history, "config": asdict(self.cfg),
            "backbone": self.model.backbone_name, "items": self.model.items.entity_ids,
            "pretrained_from": self.pretrained_from, "rng": rng,
        }

    def save_checkpoint(self) -> Path:
        """checkpoint.pt; written by process 0 only (the others hold the same state)."""
        path = self.run_dir / CHECKPOINT
        if self.dist.is_main:
            _atomic_save(self.checkpoint_state(), path)
        return path

    def load_checkpoint(self) -> bool:
        """Restore the state after the last finished epoch; False if there is no checkpoint."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            logger.info(f"[lotcrs] resume: no checkpoint at {path}; starting from the beginning")
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path}: not a LOT-CRS fine-tuning checkpoint")
        if state["backbone"] != self.model.backbone_name or state["items"] != self.model.items.entity_ids:
            raise UserError(f"{path}: made for backbone '{state['backbone']}' and {len(state['items'])} items; this "
                            f"config has '{self.model.backbone_name}' and {len(self.model.items)} "
                            f"(change lotcrs.run_name or resume: false)")
        if self.model.fusion is not None:
            store = self.run_dir / "store"
            if not (store / "manifest.json").is_file():
                raise UserError(f"{path}: the run's memory store {store} is missing; resume: false starts over")
            self.load_store(store)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.global_step = state["epoch"], state["step"]
        self.best_epoch, self.best_score = state["best_epoch"], state["best_score"]
        self.bad_epochs, self.stopped, self.history = state["bad_epochs"], state["stopped"], state["history"]
        self.pretrained_from = state.get("pretrained_from")
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.model.fusion is not None and self.cfg.store_refresh == "epoch" and self.epoch:
            self.refresh_store()  # the store of the checkpoint's model
        logger.info(f"[lotcrs] resumed from {path}: {self.epoch} epochs done, best epoch {self.best_epoch}")
        return True

    def _report_best_again(self) -> None:
        """After a resume: validate the best epoch's model once more, so that a selection hook
        attached to this system (lotcrs_plugin.system.selection) knows the best epoch before
        this run's."""
        if self.best_epoch is None or not (self.run_dir / BEST).is_file():
            return
        current = _cpu_state(self.model)
        self.best_state = torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)["model"]
        self.model.load_state_dict(self.best_state)
        refresh = self.model.uses_retrieval and self.cfg.store_refresh == "epoch"
        if refresh:
            self.refresh_store()
        self.evaluate("valid", self.best_epoch)
        self.model.load_state_dict(current)
        if refresh:
            self.refresh_store()

    # -- the saved system (crslab run --save-system / --restore-system)

    @property
    def store_file(self) -> Path:
        return Path(self.model_file).with_suffix(".store")

    def save_model(self) -> None:
        """The model (the tested one) and its memory store."""
        state = {"format": SYSTEM_FORMAT, "version": 1, "model_state_dict": self.model.state_dict(),
                 "backbone": self.model.backbone_name, "items": self.model.items.entity_ids,
                 "retrieval": self.model.fusion is not None}
        _atomic_save(state, Path(self.model_file))
        if self.model.store is not None:
            self.model.store.save(self.store_file)
        if self.model.knn is not None:
            self.model.knn.save(Path(self.model_file).with_suffix(".knn"))
        logger.info(f"[lotcrs] system saved to {self.model_file}")

    def restore_model(self) -> None:
        """Load a system written by :meth:`save_model` (called by BaseSystem.__init__)."""
        model = self.model.module if isinstance(self.model, nn.DataParallel) else self.model
        path = Path(self.model_file)
        if not path.is_file():
            raise UserError(f"restore-system: {path} does not exist; run once with --save-system "
                            f"(or set model_file)")
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
            store = Path(self.model_file).with_suffix(".store")
            if not (store / "manifest.json").is_file():
                raise UserError(f"restore-system: the memory store {store} is missing; save the system again")
            model.store = MemoryStore.load(store)
        if model.retrieval_cfg.knn_on:
            knn = Path(self.model_file).with_suffix(".knn")
            if not (knn / "knn.json").is_file():
                raise UserError(f"restore-system: the kNN store {knn} is missing; save the system again "
                                f"(or set retrieval.knn_weight: 0)")
            self.load_knn(knn)
        logger.info(f"[lotcrs] restored {path}")

    def write_summary(self) -> Path:
        report = getattr(self.evaluator, "last_report", None)
        summary = {
            "run_name": self.run_name, "backbone": self.model.backbone_name,
            "backbone_path": str(self.model.backbone_path), "pretrained_from": self.pretrained_from,
            "store_entries": len(self.model.store) if self.model.store is not None else 0,
            "teacher": self.smoothing_cfg.teacher if self.teacher is not None else "none",
            "selection": {"metric": self.selection_cfg.metric, "mode": self.selection_cfg.mode,
                          "enabled": self.selection_cfg.enabled, "best_epoch": self.best_epoch,
                          "best_score": self.best_score, "epochs_run": self.epoch, "early_stopped": self.stopped},
            "knn": getattr(self, "knn_selection", None) or (
                {"weight": self.model.knn.weight} if self.model.knn is not None else None),
            "tail_slots": getattr(self, "tail_slots_selection", None) or (
                {"slots": self.model.knn.tail_slots} if self.model.knn is not None else None),
            "history": self.history, "timings": self.timings, "config": asdict(self.cfg),
            "test": report, "test_variants": self.test_variants,
        }
        path = self.run_dir / "finetune.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        return path

    # -- talking to it (crslab run --restore-system --interact)

    def recommend(self, turns: Iterable[Mapping[str, Any]], k: int = 10) -> list[int]:
        """Catalog positions of the k best items after a dialog's turns (the layout's turn format:
        role, raw_text, movies, entity), ranked as a test sample is (the vote and its tail slots
        included)."""
        from lotcrs_plugin.data.finetune_samples import RecIndex

        bb = self.model.backbone
        table = tokenize_dialogs([{"dialog": list(turns)}], bb.tokenizer, bb.sep_ids, self.model.items, self.entity2id)
        index = RecIndex(np.array([[0, table.n_turns]], dtype=np.int64), np.zeros(1, np.int64), np.zeros(1, bool),
                         np.zeros(1, np.int64))
        evidence = (EvidenceBuilder(table, turn_roles([{"dialog": list(turns)}]), self.model.items.entity_ids)
                    if self.model.evidence is not None else None)
        batch = RecData(table, bb.input_format(self.cfg.max_length), bb.first_item_id, index,
                        evidence=evidence)[np.zeros(1, np.int64)].to(self.device)
        was = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            ranking = self.model.rank_items(batch.tokens, None, max(k, TOP_K), self.cfg.eval_chunk_elements,
                                            evidence=batch.evidence)
        self.model.train(was)
        return ranking.top_ids[0, :k].tolist()

    def interact(self) -> None:
        """A console dialog: each message (items named by their title) gets the top item and four more."""
        from crslab.data import dataset_language_map

        items = self.model.items
        shown = [n.lower() for n in items.display_names]
        turns: list[dict[str, Any]] = []
        self.finished = False
        while True:
            text = self.get_input(dataset_language_map.get(self.opt["dataset"], "en"))
            if self.finished:
                break
            low = text.lower()
            movies = [items.entity_names[i] for i, name in enumerate(shown) if name in low]
            turns.append({"role": "Seeker", "raw_text": text, "text": low.split(), "movies": movies, "entity": []})
            top = self.recommend(turns)
            reply = f"You should watch {items.display_names[top[0]]}."
            print(f"Recommender: {reply} (also: {'; '.join(items.display_names[i] for i in top[1:5])})")
            turns.append({"role": "Recommender", "raw_text": reply, "text": reply.lower().split(),
                          "movies": [items.entity_names[top[0]]], "entity": []})


__all__ = ["BLOCK", "FinetuneConfig", "LOTCRSModel", "LOTCRSSystem", "MODEL_NAME"]
