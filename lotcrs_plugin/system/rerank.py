"""The re-ranker of the LOT-CRS pipeline (beyond the paper; evaluation only): the kNN vote of the
balanced simulated store (lotcrs_plugin.model.knn) and the tail slots of the ranked lists
(lotcrs_plugin.model.tail_slots), with the choice of the vote's weight and of the slots on
validation (``knn_weight: auto``, ``tail_slots: auto``). The test split never reaches a choice.

The vote's keys are the simulated contexts encoded by a frozen encoder: the backbone as
fine-tuning starts from it (the pre-trained export, else backbone_path), or the export of a
second pre-training (``knn_pretrain``). The voter is saved in the run folder (``knn/``) and beside
a saved system (``<model_file>.knn``); its encoder is rebuilt from its source, not copied.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from loguru import logger

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.data.finetune_samples import per_item_rows
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.knn import KnnVoter, context_keys, knn_store
from lotcrs_plugin.model.lotcrs import with_tail_slots
from lotcrs_plugin.model.retrieval import MemoryStore
from lotcrs_plugin.model.tail_slots import describe, grid_settings
from lotcrs_plugin.system.samples import RecSamples, autocast
from lotcrs_plugin.system.scoring import TOP_K, evaluate_lists, evaluate_ranking, validation_scores
from lotcrs_plugin.system.selection import SelectionConfig

KNN_SHOWN = ("recall", "tail_recall", "tail_coverage")  # logged per kNN weight while it is chosen
BLOCK = "rerank"


def maximised(key: str, metric: str) -> SelectionConfig:
    """The validation score that ``rerank.<key>`` names, maximised (UserError names the key)."""
    try:
        return SelectionConfig.from_dict({"metric": metric, "mode": "max"})
    except UserError as err:
        raise UserError(f"{BLOCK}.{key}: {err}") from None


def knn_pretrain_config(opt: Any, over: Mapping[str, Any] | None, backbone_name: str) -> Any:
    """``lotcrs_pretrain`` updated by ``knn_pretrain`` (checked at start: its own run name), or None."""
    if not over:
        return None
    from lotcrs_plugin.config_blocks.pretrain import BLOCK as PRETRAIN, PretrainConfig

    block = dict(opt.get(PRETRAIN, None) or {})
    own = block.get("run_name") or f"{opt['dataset']}_{backbone_name}_pretrain"
    if over["run_name"] == own:
        raise UserError(f"{BLOCK}.knn_pretrain.run_name: '{own}' is this run's own pre-training "
                        f"(lotcrs_pretrain.run_name); give the vote's encoder another run name")
    try:
        return PretrainConfig.from_dict({**block, **over})
    except UserError as err:
        raise UserError(f"{BLOCK}.knn_pretrain: {err}") from None


def knn_encoder(model: Any, source: str, device: torch.device) -> Any:
    """The frozen encoder of the vote: the backbone at ``source`` with this catalog's item tokens."""
    from lotcrs_plugin.model.backbones import build_backbone

    bb = build_backbone(model.backbone_name, source, kg=model.kg, prompt=model.cfg.prompt)
    return model._prepare(bb).to(device)


def load_knn(model: Any, folder: Path, device: torch.device) -> KnnVoter:
    """The voter saved in ``folder``, attached to ``model`` (``model.knn``)."""
    manifest = KnnVoter.read_manifest(folder)
    voter = KnnVoter(knn_encoder(model, manifest["source"], device), MemoryStore.load(folder), len(model.items),
                     k=manifest["k"], temperature=manifest["temperature"], pooling=manifest["pooling"],
                     weight=manifest["weight"], source=manifest["source"], tail_slots=manifest.get("tail_slots"))
    model.knn = voter
    return voter


class Reranker:
    """Builds the vote (:meth:`build`) and chooses its weight and tail slots on validation."""

    def __init__(self, model: Any, samples: RecSamples, cfg: Any, store_cfg: RetrievalConfig, *,
                 selection: SelectionConfig, evaluator: Any, run_dir: Path, device: torch.device, bf16: bool,
                 eval_chunk_elements: int, pretrain_cfg: Any, pretraining: Callable[[Mapping[str, Any]], Path]):
        self.model, self.samples, self.cfg, self.store_cfg = model, samples, cfg, store_cfg
        self.selection, self.evaluator, self.run_dir = selection, evaluator, run_dir
        self.device, self.bf16, self.eval_chunk_elements = device, bf16, eval_chunk_elements
        self.pretrain_cfg = pretrain_cfg  # lotcrs_pretrain updated by knn_pretrain (None: not set)
        self.pretraining = pretraining  # runs a pre-training with these overrides, returns its export
        self._export: Path | None = None  # the export of knn_pretrain, once known
        self.knn_selection: dict[str, Any] | None = None
        self.tail_slots_selection: dict[str, Any] | None = None
        self.seconds = 0.0

    def _autocast(self) -> Any:
        return autocast(self.device, self.bf16)

    # -- the vote

    def source(self, pretrained_from: str | None) -> str:
        """Where the frozen encoder comes from: the export of ``knn_pretrain`` (its own pre-training,
        run here when it has not finished; the random state is kept, so that fine-tuning does not
        depend on it), else the run's pre-trained export, else backbone_path."""
        over = self.cfg.knn_pretrain
        if not over:
            return pretrained_from or str(self.model.backbone_path)
        if self._export is None:
            self._export = self._finished_pretraining(over)
        if self._export is None:
            state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            try:
                self._export = self.pretraining(over)
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])
                torch.set_rng_state(state[2])
        return str(self._export)

    def _finished_pretraining(self, overrides: Mapping[str, Any]) -> Path | None:
        """The export of a finished pre-training run with exactly this configuration, else None."""
        from lotcrs_plugin.paths import active_layout

        want = asdict(self.pretrain_cfg)
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

    @torch.no_grad()
    def build(self, pretrained_from: str | None) -> KnnVoter:
        """Keys of the simulated contexts by the frozen encoder, loaded afresh from its source (also
        after a resume); saved in the run folder."""
        started = time.perf_counter()
        cfg = self.cfg
        source = self.source(pretrained_from)
        encoder = knn_encoder(self.model, source, self.device).eval()
        sim = self.samples.data("simulated")
        rows = per_item_rows(sim.index.targets, cfg.knn_per_item, self.store_cfg.sample_seed)
        part = sim.subset(rows)
        keys = np.empty((len(part), self.model.backbone.hidden_size), np.float32)
        for batch in self.samples.batches(part, train=False):
            batch = batch.to(self.device)
            with self._autocast():
                keys[batch.sample_idx.cpu().numpy()] = context_keys(encoder, batch.tokens, cfg.knn_pooling).cpu().numpy()
        voter = KnnVoter(encoder, knn_store(keys, sim.index.targets[rows], self.store_cfg, cfg.knn_k),
                         len(self.model.items), k=cfg.knn_k, temperature=cfg.knn_temperature, pooling=cfg.knn_pooling,
                         weight=0.0 if cfg.knn_weight == "auto" else float(cfg.knn_weight), source=source,
                         tail_slots=None if cfg.tail_slots in (None, "auto") else cfg.tail_slots)
        self.model.knn = voter
        voter.save(self.run_dir / "knn")
        self.seconds = round(time.perf_counter() - started, 2)
        logger.info(f"[lotcrs] kNN vote: {len(voter.store)} simulated contexts of {len(voter.store.unique_items)} "
                    f"items, k {voter.k}, weight {cfg.knn_weight} ({self.seconds}s)")
        return voter

    def build_or_load(self, pretrained_from: str | None) -> KnnVoter:
        """After a resume: the run's saved vote when it has this encoder, else a new one."""
        manifest = self.run_dir / "knn" / "knn.json"
        if manifest.is_file() and KnnVoter.read_manifest(manifest.parent)["source"] == self.source(pretrained_from):
            return load_knn(self.model, manifest.parent, self.device)
        return self.build(pretrained_from)  # a run trained without the vote, or a vote of another encoder

    # -- the choices on validation

    def choose(self) -> None:
        """The weight, then the slots (each only when set to auto)."""
        self.choose_weight()
        self.choose_tail_slots()

    @torch.no_grad()
    def _valid_score_parts(self, tail: bool | None) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """(score parts, targets, unmentioned) of every validation batch: the model and the vote
        run once, the weights and slots under choice are applied to them (model.rank_scored)."""
        out = []
        for batch in self.samples.batches(self.samples.data("valid"), train=False):
            batch = batch.to(self.device)
            with self._autocast():
                out.append((self.model.score_parts(batch.tokens, tail=tail, evidence=batch.evidence), batch.targets,
                            ~batch.mentioned))
        return out

    @torch.no_grad()
    def choose_weight(self) -> None:
        """knn_weight: auto -> the grid value with the best validation selection score (ties: the
        smaller weight)."""
        voter, cfg, evaluator = self.model.knn, self.cfg, self.evaluator
        if voter is None or cfg.knn_weight != "auto":
            return
        selection = maximised("knn_metric", cfg.knn_metric) if cfg.knn_metric else self.selection
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
                        ranking, tail_top = self.model.rank_scored(scored, targets, TOP_K, self.eval_chunk_elements)
                    if tail_top is not None:
                        ranking = with_tail_slots(ranking, tail_top, voter.tail_slots, targets)
                    evaluate_ranking(evaluator, ranking, targets, unmentioned)

            scores[weight] = validation_scores(evaluator, feed, selection)[0]
            report = getattr(evaluator, "last_report", None) or {}
            shown = {k: v for k, v in report.get("metrics", {}).items() if k.split("@")[0] in KNN_SHOWN}
            logger.info(f"[lotcrs] kNN weight {weight:g} on validation: score "
                        f"{'n/a' if scores[weight] is None else f'{scores[weight]:.4f}'}; "
                        + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if v is not None))
        evaluator.reset_metrics()
        self.model.train(was)
        defined = {w: v for w, v in scores.items() if v is not None}
        sign = 1 if selection.mode == "max" else -1
        best = max(defined, key=lambda w: (sign * defined[w], -w)) if defined else 0.0
        voter.weight = best
        self.knn_selection = {"metric": selection.metric, "scores": scores, "weight": best}
        logger.info(f"[lotcrs] kNN weight chosen on validation ({selection.metric}): {best} of "
                    + ", ".join(f"{w:g}: {'n/a' if v is None else f'{v:.4f}'}" for w, v in scores.items()))

    @torch.no_grad()
    def choose_tail_slots(self) -> None:
        """tail_slots: auto -> of ``tail_slots_grid``, the setting with the best validation
        ``tail_slots_metric`` among those whose every ``tail_slots_keep`` metric stays within its
        allowed share of its value without slots (ties: fewer slots). One scoring pass over
        validation: the model's lists and the vote's tail lists are merged for every setting."""
        voter, cfg, evaluator = self.model.knn, self.cfg, self.evaluator
        if voter is None or cfg.tail_slots != "auto":
            return
        selection = maximised("tail_slots_metric", cfg.tail_slots_metric)
        losses = cfg.keep_losses
        keeps = [maximised("tail_slots_keep", metric) for metric in losses]
        was = self.model.training
        self.model.eval()
        parts = []
        for scored, targets, unmentioned in self._valid_score_parts(tail=True):
            with self._autocast():
                ranking, tail_top = self.model.rank_scored(scored, targets, TOP_K, self.eval_chunk_elements)
            parts.append((ranking, tail_top, targets, unmentioned))

        def score(setting: dict[int, int] | None) -> tuple[float | None, dict[str, float | None]]:
            def feed() -> None:
                for ranking, tail_top, targets, unmentioned in parts:
                    listed = with_tail_slots(ranking, tail_top, setting, targets)
                    evaluate_lists(evaluator, listed.top_ids.cpu(), targets.cpu(), unmentioned.cpu())

            value, *kept = validation_scores(evaluator, feed, selection, *keeps)
            return value, dict(zip(losses, kept))

        def within(kept: dict[str, float | None]) -> bool:
            return all(kept[m] is not None and floor[m] is not None and kept[m] >= floor[m] * (1 - share) - 1e-9
                       for m, share in losses.items())

        without = score(None)
        floor = without[1]
        scores: dict[str, dict[str, Any]] = {}
        best, best_score = None, None
        for setting in grid_settings(cfg.tail_slots_grid):
            value, kept = score(setting) if any(setting.values()) else without  # all zero: the lists without slots
            allowed = within(kept)
            scores[describe(setting)] = {"slots": setting, "score": value, "keep": kept, "allowed": allowed}
            shown = ", ".join(f"{m} {v:.4f}" for m, v in kept.items() if v is not None)
            logger.info(f"[lotcrs] tail slots {describe(setting)} on validation: {selection.metric} "
                        f"{'n/a' if value is None else f'{value:.4f}'}"
                        + (f", {shown} ({'kept' if allowed else 'lowered'})" if shown else ""))
            if allowed and value is not None and (best_score is None or value > best_score + 1e-12):
                best, best_score = setting, value
        evaluator.reset_metrics()
        self.model.train(was)
        voter.tail_slots = {c: n for c, n in best.items()} if best and any(best.values()) else None
        self.tail_slots_selection = {"metric": selection.metric, "keep": losses,
                                     "keep_without_slots": floor, "scores": scores, "slots": voter.tail_slots}
        floors = ", ".join(f"{m} {v:.4f} (may lose {losses[m]:.0%})" for m, v in floor.items() if v is not None)
        logger.info(f"[lotcrs] tail slots chosen on validation: {describe(voter.tail_slots)}"
                    + (f" (without slots: {floors})" if floors else ""))

    def summary(self) -> dict[str, Any]:
        """What finetune.json records under ``knn`` and ``tail_slots``."""
        voter = self.model.knn
        return {"knn": self.knn_selection or ({"weight": voter.weight} if voter is not None else None),
                "tail_slots": self.tail_slots_selection or ({"slots": voter.tail_slots} if voter is not None else None)}


__all__ = ["KNN_SHOWN", "Reranker", "knn_encoder", "knn_pretrain_config", "load_knn", "maximised"]
