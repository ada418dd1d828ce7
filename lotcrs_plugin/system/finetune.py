"""Stage 4 of the LOT-CRS pipeline: fine-tuning on the real training split, and the scoring of
validation and test.

Loss = CE + beta * KL(teacher || student) (lotcrs_plugin.model.smoothing; beta = 0 or no teacher:
CE alone) + ``retrieval.loss_weight`` x the retrieval loss of the query against the store's keys
(lotcrs_plugin.model.fusion). After every epoch the store is refreshed (``store_refresh: epoch``)
and validation is scored; the model of the best validation epoch (``selection:`` block, default
hit@1+hit@50; ties keep the earlier epoch) is kept in ``best.pt`` and tested; ``impatience``
epochs without a better score stop training. This is the run's one best-epoch selection: the
runner's selection hook (lotcrs_plugin.system.selection) is not attached to this system, it
reads :meth:`FineTuner.selection_summary`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from loguru import logger

from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.fusion import retrieval_contrastive_loss
from lotcrs_plugin.model.smoothing import SmoothingConfig, TeacherScores, label_smoothness_loss
from lotcrs_plugin.system.loop import LossSums, TrainLoop, atomic_save, cpu_state, load_checkpoint_file
from lotcrs_plugin.system.samples import RecSamples, autocast
from lotcrs_plugin.system.scoring import TOP_K, evaluate_ranking
from lotcrs_plugin.system.selection import STAGE, SelectionConfig, check_evaluator, selection_score

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CHECKPOINT_FORMAT = "lotcrs-finetune-checkpoint"


class FineTuner:
    """The training loop, the validation score and the best epoch of one fine-tuning run."""

    def __init__(self, model: Any, samples: RecSamples, cfg: FinetuneConfig, retrieval: RetrievalConfig,
                 smoothing: SmoothingConfig, selection: SelectionConfig, *, evaluator: Any, dist: Any,
                 device: torch.device, bf16: bool, run_dir: Path):
        self.model, self.samples, self.cfg = model, samples, cfg
        self.retrieval_cfg, self.smoothing_cfg, self.selection_cfg = retrieval, smoothing, selection
        self.evaluator, self.dist, self.device, self.bf16, self.run_dir = evaluator, dist, device, bf16, run_dir
        self.loop = TrainLoop(model, dist, grad_accumulation=cfg.grad_accumulation, max_grad_norm=cfg.max_grad_norm)
        self.teacher: TeacherScores | None = None
        self.terms = selection.terms()
        if evaluator is not None:  # none when interacting
            check_evaluator(evaluator, self.terms)
        self.epoch = 0  # finished epochs
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.tested_best = False  # the tested model is the best epoch's (loaded by load_best)
        self.ddp: torch.nn.Module | None = None  # the model in DDP while fine-tuning (several processes)
        self.seconds = 0.0

    def _autocast(self) -> Any:
        return autocast(self.device, self.bf16)

    # -- optimisation

    @property
    def retrieval_loss_on(self) -> bool:
        return self.model.uses_retrieval and self.retrieval_cfg.loss_weight > 0

    def train_batches(self) -> int:
        """Micro-batches per fine-tuning epoch (of all processes together)."""
        batches = math.ceil(len(self.samples.data("train")) / self.cfg.batch_size)
        if self.cfg.max_train_batches:
            batches = min(batches, self.cfg.max_train_batches)
        return batches

    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_batches() / self.cfg.grad_accumulation)

    def build_optim(self) -> None:
        cfg = self.cfg
        self.loop.build_optim(self.steps_per_epoch() * cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              warmup_ratio=cfg.warmup_ratio, rates=self.model.parameter_rates(), eps=cfg.adam_eps)

    def train_step(self, batch: Any, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch (on the device), backpropagated (scaled for accumulation, and
        by ``scale``: see lotcrs_plugin.system.distributed); returns its parts."""
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
        cfg, dist, loop = self.cfg, self.dist, self.loop
        self.model.train()
        sums = LossSums(as_float=True)
        micro = dist.plan(self.train_batches(), 0, cfg.grad_accumulation)  # this process's share (all in one)
        batches = self.samples.batches(self.samples.data("train"), train=True, epoch=self.epoch,
                                       limit=cfg.max_train_batches, micro=micro)
        step = (lambda batch, scale: self.train_step(batch.to(self.device, non_blocking=True), scale))
        from tqdm.auto import tqdm  # the bar's total: the micro-batches this epoch really runs

        bar = tqdm(total=len(micro), desc=f"fine-tune epoch {self.epoch}", unit="batch", leave=False,
                   dynamic_ncols=True, disable=not dist.is_main)
        for mb in loop.steps(micro, batches, step, sums, self.ddp):
            bar.update(mb.end - bar.n)
            if loop.global_step % cfg.log_every == 0:
                seen, count = sums.total(dist)
                logger.info(f"[lotcrs] step {loop.global_step}/{loop.total_steps}: "
                            + ", ".join(f"{k} {v / max(1, count):.4f}" for k, v in sorted(seen.items())))
        bar.close()
        seen, n = sums.total(dist)
        return {k: v / max(1, n) for k, v in seen.items()}

    # -- validation and test

    def score_batch(self, batch: Any) -> dict[str, torch.Tensor]:
        """Item scores of a batch (on the device) to the evaluator (all samples, and the subset
        ``unmentioned``), and the cross-entropy as ``rec_loss``."""
        targets = batch.targets
        with torch.no_grad(), self._autocast():
            # item chunks of at most eval_chunk_elements scores: no (B, N) matrix for large catalogs
            ranking = self.model.rank_items(batch.tokens, targets, TOP_K, self.cfg.eval_chunk_elements,
                                            evidence=batch.evidence)
        ce = evaluate_ranking(self.evaluator, ranking, targets, ~batch.mentioned)
        return {"rec_loss": ce.detach() / len(batch)}

    @torch.no_grad()
    def _score_split(self, split: str) -> None:
        """Every batch of ``split`` into a freshly reset evaluator, in eval mode (train mode restored)."""
        was = self.model.training
        self.model.eval()
        self.evaluator.reset_metrics()
        for batch in self.samples.batches(self.samples.data(split), train=False):
            self.score_batch(batch.to(self.device, non_blocking=True))
        self.model.train(was)

    def evaluate(self, split: str, epoch: int = -1) -> None:
        """Score a split and report it ('valid' or 'test')."""
        self._score_split(split)
        self.evaluator.report(epoch=epoch, mode="test" if split == "test" else "valid")

    def quiet_report(self, split: str) -> dict[str, Any] | None:
        """The long-tail report of ``split`` as it is scored now, kept out of the run's reports."""
        if not hasattr(self.evaluator, "longtail_report"):
            return None
        self._score_split(split)
        report = self.evaluator.longtail_report(-1, split)
        self.evaluator.reset_metrics()
        return report

    def validate(self, epoch: int) -> float | None:
        """The selection score on validation: process 0 scores it, every process receives it (the
        same best epoch and early stop everywhere)."""
        score = None
        if self.dist.is_main:
            self.evaluate("valid", epoch)
            score = selection_score(self.evaluator, self.terms)
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
                self.best_state = cpu_state(self.model)
                atomic_save({"epoch": epoch, "score": score, "model": self.best_state}, self.run_dir / BEST)
        else:
            self.bad_epochs += 1
        best = "n/a" if self.best_score is None else f"{self.best_score:.4f}"
        logger.info(f"[lotcrs] epoch {epoch}: validation {self.selection_cfg.metric} = "
                    f"{'undefined' if score is None else f'{score:.4f}'}; best epoch {self.best_epoch} ({best})")

    def run(self, refresh_store: Callable[[], None] | None, end_of_epoch: Callable[[], None]) -> None:
        """Train until ``epochs`` (or the early stop); ``refresh_store`` after each epoch (store_refresh:
        epoch), then validation, then ``end_of_epoch`` (the checkpoint)."""
        cfg = self.cfg
        started = time.perf_counter()
        logger.info(f"[lotcrs] 4/4 fine-tuning: {len(self.samples.data('train'))} training samples, "
                    f"{self.steps_per_epoch()} steps per epoch, {cfg.epochs} epochs, effective batch "
                    f"{cfg.batch_size * cfg.grad_accumulation}, retrieval {'on' if self.model.uses_retrieval else 'off'}"
                    f"{' + loss' if self.retrieval_loss_on else ''}, label smoothness "
                    f"{'on (' + self.smoothing_cfg.teacher + ' teacher)' if self.teacher is not None else 'off'}"
                    f"{f', {self.dist.world} processes' if self.dist.active else ''}")
        self.ddp = self.dist.wrap(self.model)  # None in one process
        while self.epoch < cfg.epochs and not self.stopped:
            losses = self.train_epoch()
            epoch = self.epoch
            self.epoch += 1
            if refresh_store is not None:
                refresh_store()
            self.observe(epoch, self.validate(epoch), losses)
            if cfg.impatience and self.bad_epochs >= cfg.impatience:
                self.stopped = True
                logger.info(f"[lotcrs] early stop: {self.bad_epochs} epochs without a better validation score")
            end_of_epoch()
        self.ddp = None
        self.seconds = round(time.perf_counter() - started, 2)

    def load_best(self) -> None:
        """Put the best validation epoch's model in place for the test (the last one stays when
        selection is off or no epoch had a defined score)."""
        if not (self.selection_cfg.enabled and self.best_epoch is not None):
            return
        state = self.best_state
        if state is None and (self.run_dir / BEST).is_file():
            state = torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)["model"]
        if state is None:
            return
        self.model.load_state_dict(state)
        self.tested_best = True
        logger.info(f"[lotcrs] testing the model of epoch {self.best_epoch} (validation "
                    f"{self.selection_cfg.metric} = {self.best_score:.4f}); the last epoch was {self.epoch - 1}")

    # -- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """The loop's state and the selection's (the caller adds what the run is: config, backbone)."""
        return {"format": CHECKPOINT_FORMAT, "version": 1, **self.loop.state(), "epoch": self.epoch,
                "best_epoch": self.best_epoch, "best_score": self.best_score, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped, "history": self.history}

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The run's checkpoint (weights_only), checked against this model; None if there is none."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            logger.info(f"[lotcrs] resume: no checkpoint at {path}; starting from the beginning")
            return None
        state = load_checkpoint_file(path, CHECKPOINT_FORMAT, "fine-tuning checkpoint")
        if state["backbone"] != self.model.backbone_name or state["items"] != self.model.items.entity_ids:
            raise UserError(f"{path}: made for backbone '{state['backbone']}' and {len(state['items'])} items; this "
                            f"config has '{self.model.backbone_name}' and {len(self.model.items)} "
                            f"(change lotcrs.run_name or resume: false)")
        return state

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        self.loop.load_state(state)
        self.epoch = state["epoch"]
        self.best_epoch, self.best_score = state["best_epoch"], state["best_score"]
        self.bad_epochs, self.stopped, self.history = state["bad_epochs"], state["stopped"], list(state["history"])

    def save_checkpoint(self, extra: Mapping[str, Any]) -> Path:
        """checkpoint.pt; written by process 0 only (the others hold the same state)."""
        path = self.run_dir / CHECKPOINT
        if self.dist.is_main:
            atomic_save({**self.checkpoint_state(), **extra}, path)
        return path

    def selection_summary(self) -> dict[str, Any]:
        """The results JSON's ``selection`` entry (the keys of BestEpochSelector.summary)."""
        return {"enabled": True, "stage": STAGE, "metric": self.selection_cfg.metric, "mode": self.selection_cfg.mode,
                "selected_epoch": self.best_epoch, "validation_score": self.best_score,
                "last_epoch": self.history[-1]["epoch"] if self.history else None, "restored": self.tested_best,
                "history": [{"epoch": h["epoch"], "score": h["score"]} for h in self.history],
                "notes": [] if self.best_epoch is not None else
                ["no validation score before the test pass: the last model is tested"]}


__all__ = ["BEST", "CHECKPOINT", "CHECKPOINT_FORMAT", "FineTuner"]
