"""LOT-CRS end to end as a CRSLab system: ``model: LOTCRS``.

    crslab run --config crslab_configs/lotcrs_redial.yaml

``fit()`` runs the pipeline of the paper (Zhao et al., RecSys 2023; /work/shared/LOTCRS_NOTES.md),
each stage a module of its own with a small interface that this class calls:

1. pre-training (``lotcrs.pretrain: true``; lotcrs_plugin.system.pretrain): DMP + CCA on the
   balanced simulated data; its export replaces the backbone. With ``pretrain: false`` the
   backbone is ``backbone_path`` as it is (a raw model: the "no pre-training" ablation; or the
   export of an earlier pre-training run, ``<root>/save/<run>/backbone``);
2. the memory store (``lotcrs.retrieval: true``; .store), and the re-ranker (``rerank:`` block;
   .rerank; beyond the paper): the kNN vote of the simulated contexts and the tail slots;
3. the label-smoothness teacher (``smoothing.teacher``; .teacher);
4. fine-tuning on the real training split, validated after every epoch (.finetune, on the training
   loop of .loop). The best epoch is fine-tuning's own choice (``selection:`` block, scored as
   lotcrs_plugin.system.selection scores it, ties keep the earlier epoch): the runner attaches no
   selection hook to this system and records :meth:`LOTCRSSystem.selection_summary`;
5. test of the best epoch's model (``evaluator: longtail``): all test samples and the subset
   ``unmentioned`` (targets not named earlier in the dialog).

The samples of every stage: .samples (lotcrs_plugin.data.finetune_samples: one per distinct item
named in a Recommender turn, context = the turns before it). Talking to it: .interact.

Files under ``<root>/save/<run name>/`` (``lotcrs.run_name``, else ``<dataset>_<backbone>_lotcrs``):
``checkpoint.pt`` (model, optimizer, scheduler, epoch, selection state, RNG; written after every
epoch; ``resume: true`` continues after the last finished epoch), ``best.pt`` (the best validation
epoch's model), ``store/`` (the memory store), ``teacher/`` (cached teacher distributions),
``finetune.json`` (summary). ``crslab run --save-system`` writes the tested model to
``<root>/save/<model_file or LOTCRS.pth>``, its store and its vote beside it (.saved);
``--restore-system`` loads them and only tests.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from lotcrs_plugin import compat
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.hardware import bf16_autocast_pays, cpu_info, training_threads

compat.apply()  # crslab is imported only through the patches

import numpy as np  # noqa: E402
import torch  # noqa: E402
from crslab.system.base import BaseSystem  # noqa: E402
from loguru import logger  # noqa: E402
from torch import nn  # noqa: E402

from lotcrs_plugin.config_blocks.finetune import BLOCK, FinetuneConfig  # noqa: E402
from lotcrs_plugin.data.finetune_samples import RecData  # noqa: E402
from lotcrs_plugin.model.backbones import load_backbone  # noqa: E402
from lotcrs_plugin.model.knn import KnnVoter  # noqa: E402
from lotcrs_plugin.model.lotcrs import MODEL_NAME, LOTCRSModel  # noqa: E402
from lotcrs_plugin.model.retrieval import MemoryStore  # noqa: E402
from lotcrs_plugin.model.smoothing import SmoothingConfig, TeacherScores  # noqa: E402
from lotcrs_plugin.system import distributed, interact, saved  # noqa: E402
from lotcrs_plugin.system.conversation import ConversationStage, LOTCRSView  # noqa: E402
from lotcrs_plugin.system.finetune import CHECKPOINT, FineTuner  # noqa: E402
from lotcrs_plugin.system.rerank import Reranker, knn_pretrain_config  # noqa: E402
from lotcrs_plugin.system.samples import RecSamples, autocast  # noqa: E402
from lotcrs_plugin.system.selection import SelectionConfig  # noqa: E402
from lotcrs_plugin.system.store import StoreStage  # noqa: E402
from lotcrs_plugin.system.teacher import teacher_scores  # noqa: E402


class LOTCRSSystem(BaseSystem):
    """The LOT-CRS pipeline (see the module docstring)."""

    rec_index_space = "position"  # ranks and labels are catalog positions (the long-tail evaluator reads it)
    owns_selection = True  # the best epoch is fine-tuning's own: the runner attaches no selection hook

    def __init__(self, opt, train_dataloader, valid_dataloader, test_dataloader, vocab, side_data,
                 restore_system=False, interact=False, debug=False, tensorboard=False):
        super().__init__(opt, train_dataloader, valid_dataloader, test_dataloader, vocab, side_data,
                         restore_system, interact, debug, tensorboard)
        if isinstance(self.model, nn.DataParallel):  # CRSLab wraps every model on GPU; one device here
            self.model = self.model.module
        model: LOTCRSModel = self.model
        self.cfg: FinetuneConfig = model.cfg
        self.retrieval_cfg = model.retrieval_cfg
        self.rerank_cfg = model.rerank_cfg
        try:
            self.smoothing_cfg = SmoothingConfig.from_dict(opt.get("smoothing", None))
            self.selection_cfg = SelectionConfig.from_dict(opt.get("selection", None))
        except UserError as err:
            raise UserError(f"config: {err}") from None
        self.seed = self.cfg.seed if self.cfg.seed >= 0 else int(opt.get("seed", 42))
        from lotcrs_plugin.paths import active_layout

        self.run_name = self.cfg.run_name or f"{opt['dataset']}_{model.backbone_name}_lotcrs"
        self.run_dir = active_layout().save / self.run_name
        self.entity2id = vocab["entity2id"]
        self.restored = bool(restore_system)
        self.autocast = self.cfg.bf16 and bf16_autocast_pays(self.device)
        self.pretrained_from: str | None = None
        self.timings: dict[str, float] = {}
        # name -> long-tail test report of a variant of the tested model (e.g. without tail slots)
        self.test_variants: dict[str, Any] = {}
        self.dist = distributed.current()  # one process unless torchrun started several
        evaluator = getattr(self, "evaluator", None)  # none when interacting
        self.samples = RecSamples(model, self.cfg, opt, self.entity2id, seed=self.seed, dist=self.dist,
                                  device=self.device)
        self.stores = StoreStage(model, self.samples, self.retrieval_cfg, device=self.device, bf16=self.autocast)
        self.rerank = Reranker(model, self.samples, self.rerank_cfg, self.retrieval_cfg, selection=self.selection_cfg,
                               evaluator=evaluator, run_dir=self.run_dir, device=self.device, bf16=self.autocast,
                               eval_chunk_elements=self.cfg.eval_chunk_elements,
                               pretrain_cfg=knn_pretrain_config(opt, self.rerank_cfg.knn_pretrain, model.backbone_name),
                               pretraining=self._pretraining)
        self.tuner = FineTuner(model, self.samples, self.cfg, self.retrieval_cfg, self.smoothing_cfg,
                               self.selection_cfg, evaluator=evaluator, dist=self.dist, device=self.device,
                               bf16=self.autocast, run_dir=self.run_dir)
        if self.rerank_cfg.tail_slots is not None:
            catalog = getattr(self.evaluator, "catalog", None)
            if catalog is None:
                raise UserError("rerank.tail_slots: needs `evaluator: longtail`, whose longtail: block "
                                "defines the tail items; set it, or tail_slots: null")
            model.tail_items = torch.as_tensor(np.asarray(catalog.is_tail, dtype=bool))
        # the conversation stage (conversation: block; lotcrs_plugin/system/conversation.py), None when off
        self.conversation = ConversationStage.from_opt(opt, active_layout().save, f"{self.run_name}_conv", self.device,
                                                       self.seed)
        if self.conversation is not None and restore_system:
            self.conversation.load(Path(self.model_file).with_suffix(".conv"))

    # -- what the stages share, and CRSLab's interface

    def dialogs(self, split: str) -> Iterable[dict]:
        return self.samples.dialogs(split)

    def data(self, split: str) -> RecData:
        return self.samples.data(split)

    def batches(self, data: RecData, **kwargs: Any) -> torch.utils.data.DataLoader:
        return self.samples.batches(data, **kwargs)

    def _autocast(self) -> Any:
        return autocast(self.device, self.autocast)

    @property
    def folder(self) -> Path:
        """The dataset's processed folder."""
        return self.samples.folder

    def encode_store_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of simulated samples with the current backbone (the store's encoding)."""
        return self.stores.encode(rows)

    def step(self, batch, stage, mode, *, scale: float = 1.0):
        """Train: the loss of one micro-batch, backpropagated; returns its parts. Valid/test: item
        scores to the evaluator and the cross-entropy as ``rec_loss`` (lotcrs_plugin.system.finetune)."""
        batch = batch.to(self.device, non_blocking=True)
        if mode == "train":
            return self.tuner.train_step(batch, scale)
        return self.tuner.score_batch(batch)

    def evaluate(self, split: str, epoch: int = -1) -> None:
        self.tuner.evaluate(split, epoch)

    def build_optim(self) -> None:
        self.tuner.build_optim()

    def optimizer_step(self) -> None:
        self.tuner.loop.optimizer_step()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.tuner.loop.optimizer

    # -- 1. pre-training

    def _pretraining(self, overrides: Mapping[str, Any] | None = None) -> Path:
        """Run pre-training with this config's ``lotcrs_pretrain:`` block (updated by ``overrides``);
        its export (lotcrs_plugin.system.pretrain.run_pretraining)."""
        from lotcrs_plugin.system.pretrain import run_pretraining

        return run_pretraining(self.opt, self.model.backbone_path, overrides, loaders=(
            self.train_dataloader, self.valid_dataloader, self.test_dataloader), vocab=self.vocab,
            side_data=self.side_data)

    def pretrain(self) -> Path:
        """Pre-train (step 1 of 4) and load the export as the backbone."""
        started = time.perf_counter()
        logger.info("[lotcrs] 1/4 pre-training")
        export = self._pretraining()
        self.model.set_backbone(load_backbone(export, kg=self.model.kg, expect=self.model.backbone_name,
                                              prompt=self.cfg.prompt))
        self.samples.clear()  # tokenized by the old backbone object
        self.pretrained_from = str(export)
        self.timings["pretrain_s"] = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] pre-trained backbone loaded from {export}")
        return export

    # -- 2. the memory store; 2b. the re-ranker (tests and benchmarks call these by name)

    def build_store(self) -> MemoryStore:
        store = self.stores.build()
        self.timings["store_s"] = self.stores.seconds
        return store

    @property
    def store_rows(self) -> np.ndarray | None:
        return self.stores.rows

    def build_knn(self) -> KnnVoter:
        voter = self.rerank.build(self.pretrained_from)
        self.timings["knn_s"] = self.rerank.seconds
        return voter

    def choose_knn_weight(self) -> None:
        self.rerank.choose_weight()

    @property
    def knn_selection(self) -> dict[str, Any] | None:
        return self.rerank.knn_selection

    # -- 5. test

    def test(self) -> None:
        """Test the best validation epoch's model (the last one when selection is off or no
        epoch had a defined score), with the store of that model and the re-ranker's choices."""
        if not self.restored:
            self.tuner.load_best()
            if self.model.uses_retrieval and self.cfg.store_refresh == "epoch":
                self.stores.refresh()  # the store of the tested model
            if self.model.knn is not None:
                self.rerank.choose()
        self.tuner.evaluate("test")
        voter = self.model.knn
        if voter is not None and voter.tail_slots and any(voter.tail_slots.values()):
            # the same model's test lists without the tail slots: what the model itself ranks
            slots, voter.tail_slots = voter.tail_slots, None
            try:
                self.test_variants["without_tail_slots"] = self.tuner.quiet_report("test")
            finally:
                voter.tail_slots = slots

    def selection_summary(self) -> dict[str, Any] | None:
        """What the results JSON records under ``selection`` (None: selection is off)."""
        return self.tuner.selection_summary() if self.selection_cfg.enabled else None

    # -- the whole pipeline

    def fit(self) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(training_threads(self.cfg.threads))  # 0: the free cores (lotcrs_plugin.hardware)
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
                if self.conversation is not None:
                    self.conversation.test(LOTCRSView(self))
            dist.barrier()
            return
        if self.model.ranker is not None:  # a training-free baseline: nothing to train or select
            logger.info(f"[lotcrs] ranker {self.cfg.ranker}: no training; testing it")
            if dist.is_main:
                self.tuner.evaluate("test")
                self.timings["total_s"] = round(time.perf_counter() - started, 2)
                self.write_summary()
            dist.barrier()
            return
        dist.check_accumulation(self.cfg.grad_accumulation, f"{BLOCK}.grad_accumulation")
        resumed = False
        if self.cfg.resume:
            self.tuner.build_optim()
            resumed = self.resume()
        if not resumed:
            if self.cfg.pretrain:
                self.pretrain()
            if self.model.fusion is not None:
                if dist.is_main:  # process 0 builds the store; the others load what it saved
                    self.build_store()
                    self.stores.save(self.run_dir / "store")
                dist.barrier()
                if not dist.is_main:
                    self.stores.load(self.run_dir / "store")
        if self.rerank_cfg.knn_on and dist.is_main:  # only process 0 tests: the vote is its own
            if resumed:
                self.rerank.build_or_load(self.pretrained_from)
            else:
                self.build_knn()
        if self.smoothing_cfg.enabled:
            if dist.is_main:  # process 0 trains the teacher and caches its scores; the others load them
                started_teacher = time.perf_counter()
                self.tuner.teacher = teacher_scores(self.model, self.samples, self.cfg, self.smoothing_cfg,
                                                    seed=self.seed, cache=self.run_dir / "teacher",
                                                    device=self.device, bf16=self.autocast)
                self.timings["teacher_s"] = round(time.perf_counter() - started_teacher, 2)
            dist.barrier()
            if not dist.is_main:
                self.tuner.teacher = TeacherScores.load(self.run_dir / "teacher", expect_kind=self.smoothing_cfg.teacher)
        if not resumed:
            self.tuner.build_optim()
        refresh = self.model.uses_retrieval and self.cfg.store_refresh == "epoch"
        self.tuner.run(self.stores.refresh if refresh else None, self.save_checkpoint)
        self.timings["finetune_s"] = self.tuner.seconds
        if dist.is_main:  # process 0 tests and writes the summary
            self.test()
            self.timings["total_s"] = round(time.perf_counter() - started, 2)
            self.write_summary()
            if self.conversation is not None:  # after the recommender: its items fill the replies
                self.conversation.fit(LOTCRSView(self))
        dist.barrier()

    # -- checkpoints (the training loop's, lotcrs_plugin.system.loop, with what the run is)

    def save_checkpoint(self) -> Path:
        return self.tuner.save_checkpoint({"config": asdict(self.cfg), "backbone": self.model.backbone_name,
                                           "items": self.model.items.entity_ids,
                                           "pretrained_from": self.pretrained_from})

    def resume(self) -> bool:
        """Restore the state after the last finished epoch; False if there is no checkpoint."""
        state = self.tuner.read_checkpoint()
        if state is None:
            return False
        if self.model.fusion is not None:
            store = self.run_dir / "store"
            if not (store / "manifest.json").is_file():
                raise UserError(f"{self.run_dir / CHECKPOINT}: the run's memory store {store} is missing; "
                                f"resume: false starts over")
            self.stores.load(store)
        self.tuner.load_checkpoint_state(state)
        self.pretrained_from = state.get("pretrained_from")
        if self.model.fusion is not None and self.cfg.store_refresh == "epoch" and self.tuner.epoch:
            self.stores.refresh()  # the store of the checkpoint's model
        logger.info(f"[lotcrs] resumed from {self.run_dir / CHECKPOINT}: {self.tuner.epoch} epochs done, "
                    f"best epoch {self.tuner.best_epoch}")
        return True

    # -- the saved system (crslab run --save-system / --restore-system; lotcrs_plugin.system.saved)

    @property
    def store_file(self) -> Path:
        return saved.store_file(self.model_file)

    def save_model(self) -> None:
        """The model (the tested one), its memory store and its vote."""
        saved.save_system(self.model, self.model_file)
        if self.conversation is not None:
            self.conversation.save(Path(self.model_file).with_suffix(".conv"))

    def restore_model(self) -> None:
        """Load a system written by :meth:`save_model` (called by BaseSystem.__init__, before this
        class's __init__ has made its stages)."""
        saved.restore_system(self.model, self.model_file, self.device)

    def write_summary(self) -> Path:
        tuner = self.tuner
        summary = {
            "run_name": self.run_name, "backbone": self.model.backbone_name,
            "backbone_path": str(self.model.backbone_path), "pretrained_from": self.pretrained_from,
            "store_entries": len(self.model.store) if self.model.store is not None else 0,
            "teacher": self.smoothing_cfg.teacher if tuner.teacher is not None else "none",
            "selection": {"metric": self.selection_cfg.metric, "mode": self.selection_cfg.mode,
                          "enabled": self.selection_cfg.enabled, "best_epoch": tuner.best_epoch,
                          "best_score": tuner.best_score, "epochs_run": tuner.epoch, "early_stopped": tuner.stopped},
            **self.rerank.summary(),
            "history": tuner.history, "timings": self.timings, "config": asdict(self.cfg),
            "test": getattr(self.evaluator, "last_report", None), "test_variants": self.test_variants,
        }
        path = self.run_dir / "finetune.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        return path

    # -- talking to it (crslab run --restore-system --interact; lotcrs_plugin.system.interact)

    def recommend(self, turns: Iterable[Mapping[str, Any]], k: int = 10) -> list[int]:
        """Catalog positions of the k best items after a dialog's turns, ranked as a test sample is."""
        return interact.recommend(self.model, turns, self.entity2id, max_length=self.cfg.max_length,
                                  eval_chunk_elements=self.cfg.eval_chunk_elements, device=self.device,
                                  bf16=self.autocast, k=k)

    def interact(self) -> None:
        """A console dialog: each message (items named by their title) gets the top item and four more."""
        from crslab.data import dataset_language_map

        from lotcrs_plugin.data.entity_linking import AttributeLinker

        language = dataset_language_map.get(self.opt["dataset"], "en")
        self.finished = False
        conversation = self.conversation
        reply = (None if conversation is None else
                 lambda turns, item: conversation.reply(LOTCRSView(self), turns, item))
        interact.console(self.model.items, lambda: self.get_input(language), lambda: self.finished, self.recommend,
                         link=AttributeLinker.from_folder(self.folder), reply=reply)


__all__ = ["BLOCK", "FinetuneConfig", "LOTCRSModel", "LOTCRSSystem", "MODEL_NAME"]
