"""Ranked lists to the evaluator, and the selection score read back from it: what validation and
test (lotcrs_plugin.system.finetune) and the choices of the re-ranker on validation
(lotcrs_plugin.system.rerank) share."""

from __future__ import annotations

from typing import Any, Callable

import torch
from crslab.evaluator.metrics.base import AverageMetric

from lotcrs_plugin.data.finetune_samples import SUBSET_UNMENTIONED
from lotcrs_plugin.system.selection import SelectionConfig, selection_score

TOP_K = 50  # CRSLab's systems rank the top 50


def evaluate_ranking(evaluator: Any, ranking: Any, targets: torch.Tensor, unmentioned: torch.Tensor) -> torch.Tensor:
    """A batch's ranking to the evaluator (its lists, and the cross-entropy as rec_loss); the summed CE."""
    ce = ranking.cross_entropy("sum")
    evaluator.optim_metrics.add("rec_loss", AverageMetric(float(ce), int(targets.shape[0])))
    evaluate_lists(evaluator, ranking.top_ids.cpu(), targets.cpu(), unmentioned.cpu())
    return ce


def evaluate_lists(evaluator: Any, ranks: torch.Tensor, labels: torch.Tensor, unmentioned: torch.Tensor) -> None:
    """Top lists to the evaluator: all samples, and the subset ``unmentioned``."""
    if hasattr(evaluator, "rec_evaluate_batch"):
        evaluator.rec_evaluate_batch(ranks, labels, subsets={SUBSET_UNMENTIONED: unmentioned})
    else:  # CRSLab's own evaluators take one sample at a time
        for r, y in zip(ranks.tolist(), labels.tolist()):
            evaluator.rec_evaluate(r, y)


def validation_scores(evaluator: Any, feed: Callable[[], None], *selections: SelectionConfig) -> list[float | None]:
    """Reset the evaluator, let ``feed()`` give it validation lists, and read each selection score
    off its report (none is logged as a report: the choice is not an epoch)."""
    evaluator.reset_metrics()
    feed()
    if hasattr(evaluator, "longtail_report"):
        evaluator.last_report = evaluator.longtail_report(-1, "valid")
    return [selection_score(evaluator, sel.terms()) for sel in selections]


__all__ = ["TOP_K", "evaluate_lists", "evaluate_ranking", "validation_scores"]
