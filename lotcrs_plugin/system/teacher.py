"""Stage 3 of the LOT-CRS pipeline: the label-smoothness teacher (lotcrs_plugin.model.smoothing).

A copy of the pre-trained model without retrieval (``LOTCRSModel.teacher_copy``) is fine-tuned
for ``lotcrs.teacher_epochs`` on the simulated dialogs (``smoothing.teacher: simulated``, the
paper's description) or on the real training split (``real``; the authors' code trains a KGSF
there); its item distribution for every training sample is computed once and cached
(:class:`TeacherScores`) in the run folder's ``teacher/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger

from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
from lotcrs_plugin.model.smoothing import SmoothingConfig, TeacherScores
from lotcrs_plugin.system.optim import adamw_linear
from lotcrs_plugin.system.samples import RecSamples, autocast


def teacher_scores(model: torch.nn.Module, samples: RecSamples, cfg: FinetuneConfig, sm: SmoothingConfig, *,
                   seed: int, cache: Path, device: torch.device, bf16: bool) -> TeacherScores:
    """The teacher's item distribution for every training sample of ``samples``; a resumed run
    (``cfg.resume``) reuses the scores cached in ``cache`` (delete it to train the teacher again)."""
    train = samples.data("train")
    if cfg.resume and (cache / "manifest.json").is_file():
        scores = TeacherScores.load(cache, expect_kind=sm.teacher)
        if len(scores) == len(train):
            logger.info(f"[lotcrs] 3/4 teacher scores loaded from {cache}")
            return scores
    started = time.perf_counter()
    teacher = model.teacher_copy().to(device)
    source = samples.data("simulated" if sm.teacher == "simulated" else "train")
    rows = np.arange(len(source))
    if cfg.teacher_max_samples and len(rows) > cfg.teacher_max_samples:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), cfg.teacher_max_samples, replace=False))
    part = source.subset(rows)
    # the head and the evidence term at their own rates, as in fine-tuning; a constant rate (no schedule)
    optimizer, _ = adamw_linear(teacher, lr=cfg.teacher_lr, weight_decay=cfg.weight_decay, warmup_ratio=0.0,
                                total_steps=1, rates=teacher.parameter_rates(), eps=cfg.adam_eps)
    teacher.train()

    def teacher_step() -> None:
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n = 0
    for epoch in range(cfg.teacher_epochs):
        for batch in samples.batches(part, train=True, epoch=10_000 + epoch):
            batch = batch.to(device)
            with autocast(device, bf16):
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
            for batch in samples.batches(train, train=False):
                batch = batch.to(device)
                with autocast(device, bf16):
                    yield batch.sample_idx, teacher(batch.tokens, evidence=batch.evidence).logits.float()

    scores = TeacherScores.collect(logits_of_train(), len(train), kind=sm.teacher, temperature=sm.temperature,
                                   top_k=sm.top_k)
    del teacher, optimizer
    scores.save(cache)
    logger.info(f"[lotcrs] 3/4 teacher trained on {len(part)} {sm.teacher} samples for {cfg.teacher_epochs} "
                f"epoch(s); distributions of {len(train)} training samples cached in {cache} "
                f"({time.perf_counter() - started:.2f}s)")
    return scores


__all__ = ["teacher_scores"]
