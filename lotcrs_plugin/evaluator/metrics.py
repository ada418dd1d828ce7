"""Recommendation metrics at a cut-off k, each a small class with its definition (RecBole style).

Every metric reads a :class:`RankData`: the top-K lists of N samples as catalog positions and
the N target positions, with the :class:`~lotcrs_plugin.evaluator.catalog.Catalog`; all of
them are numpy expressions over the whole array (no loop over samples or items).

Sample metrics average a per-sample value over the samples they apply to; list metrics look at
the multiset of all recommended items. Recall, NDCG and MRR equal CRSLab's hit@k, ndcg@k and
mrr@k (one target per sample).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lotcrs_plugin.evaluator.catalog import Catalog


@dataclass(frozen=True, eq=False)
class RankData:
    """N ranked lists in catalog positions.

    ranks (N, K): catalog positions, -1 for a recommended entity that is not a catalog item and
    for padding; labels (N,): target positions, -1 for a target outside the catalog (a miss,
    not tail); lengths (N,): the length each list had before padding.
    """

    ranks: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    catalog: Catalog

    @property
    def n_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def width(self) -> int:
        """The shortest list length: a cut-off above it is not reported."""
        return int(self.lengths.min()) if self.lengths.size else 0

    def subset(self, mask: np.ndarray) -> "RankData":
        return RankData(self.ranks[mask], self.labels[mask], self.lengths[mask], self.catalog)

    def top(self, k: int) -> np.ndarray:
        return self.ranks[:, :k]

    def hit_rank(self, k: int) -> np.ndarray:
        """(N,) 0-based rank of the target within the top k, -1 where it is not there."""
        eq = (self.top(k) == self.labels[:, None]) & (self.labels[:, None] >= 0)
        return np.where(eq.any(axis=1), eq.argmax(axis=1), -1)

    def target_is_tail(self) -> np.ndarray:
        """(N,) whether the target is a tail item."""
        inside = self.labels >= 0
        return inside & self.catalog.is_tail[np.where(inside, self.labels, 0)]

    def recommended_counts(self, k: int) -> np.ndarray:
        """(n_items,) how often each catalog item appears in the top-k lists."""
        top = self.top(k)
        return np.bincount(top[top >= 0], minlength=self.catalog.n_items)


class Metric(ABC):
    """One metric at cut-off k; ``key`` is ``name@k``."""

    name: ClassVar[str]

    def __init__(self, k: int):
        self.k = int(k)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.k}"

    @abstractmethod
    def calculate(self, data: RankData) -> float:
        """The value over all of ``data``; NaN where it is undefined (nothing to average)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


class SampleMetric(Metric):
    """A mean of per-sample values over the samples selected by :meth:`applies`."""

    @abstractmethod
    def sample_values(self, data: RankData) -> np.ndarray:
        """(N,) float value of each sample."""

    def applies(self, data: RankData) -> np.ndarray:
        """(N,) bool: which samples the mean is over (all by default)."""
        return np.ones(data.n_samples, dtype=bool)

    def calculate(self, data: RankData) -> float:
        mask = self.applies(data)
        if not mask.any():
            return float("nan")
        return float(self.sample_values(data)[mask].mean())


class Recall(SampleMetric):
    r"""Recall@k (CRSLab's hit@k): the share of samples whose target is in the top k.

    .. math:: \mathrm{Recall@}k = \frac{1}{N}\sum_{u=1}^{N} \mathbb{1}[\mathrm{target}_u \in R_u^{k}]

    With one target per sample, recall and hit rate coincide.
    """

    name = "recall"

    def sample_values(self, data: RankData) -> np.ndarray:
        return (data.hit_rank(self.k) >= 0).astype(np.float64)


class NDCG(SampleMetric):
    r"""NDCG@k with one relevant item: :math:`1/\log_2(r+2)` for a target at 0-based rank
    :math:`r < k`, else 0, averaged over samples (the ideal DCG is 1)."""

    name = "ndcg"

    def sample_values(self, data: RankData) -> np.ndarray:
        r = data.hit_rank(self.k)
        return np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)


class MRR(SampleMetric):
    r"""MRR@k: :math:`1/(r+1)` for a target at 0-based rank :math:`r < k`, else 0, averaged."""

    name = "mrr"

    def sample_values(self, data: RankData) -> np.ndarray:
        r = data.hit_rank(self.k)
        return np.where(r >= 0, 1.0 / (np.maximum(r, 0) + 1.0), 0.0)


class TailRecall(Recall):
    r"""Tail-Recall@k: Recall@k over the samples whose target is a tail item.

    .. math:: \frac{|\{u : t_u \in T,\ t_u \in R_u^{k}\}|}{|\{u : t_u \in T\}|}

    NaN when no target is a tail item.
    """

    name = "tail_recall"

    def applies(self, data: RankData) -> np.ndarray:
        return data.target_is_tail()


class AveragePopularity(Metric):
    r"""Average popularity@k: the mean popularity (the catalog's mention count) of the items
    in all top-k lists, each list entry counted once:

    .. math:: \frac{1}{N k}\sum_{u}\sum_{i \in R_u^{k}} \mathrm{pop}(i)

    Entries that are not catalog items are left out.
    """

    name = "avg_popularity"

    def calculate(self, data: RankData) -> float:
        top = data.top(self.k)
        valid = top >= 0
        if not valid.any():
            return float("nan")
        return float(data.catalog.counts[top[valid]].mean())


class Coverage(Metric):
    r"""Coverage@k: the share of the catalog that appears in at least one top-k list.

    .. math:: \frac{|\bigcup_u R_u^{k}|}{|I|}
    """

    name = "coverage"

    def calculate(self, data: RankData) -> float:
        return float((data.recommended_counts(self.k) > 0).sum() / data.catalog.n_items)


class TailCoverage(Metric):
    r"""Tail-Coverage@k: the share of the TAIL items that appear in at least one top-k list.

    .. math:: \frac{|\bigcup_u R_u^{k} \cap T|}{|T|}

    The denominator is the number of tail items, not the catalog size. NaN when the tail is
    empty.
    """

    name = "tail_coverage"

    def calculate(self, data: RankData) -> float:
        n_tail = data.catalog.n_tail
        if n_tail == 0:
            return float("nan")
        shown = data.recommended_counts(self.k) > 0
        return float((shown & data.catalog.is_tail).sum() / n_tail)


class Gini(Metric):
    r"""Gini@k: the Gini index of how often each catalog item appears in the top-k lists.

    With the n counts sorted ascending, :math:`c_{(1)} \le \dots \le c_{(n)}`,

    .. math:: G = \frac{\sum_{i=1}^{n} (2i - n - 1)\, c_{(i)}}{n \sum_{i} c_{(i)}}

    0 when every item is recommended equally often, :math:`(n-1)/n` when one item gets every
    recommendation. Items never recommended count as 0. NaN when nothing was recommended.
    """

    name = "gini"

    def calculate(self, data: RankData) -> float:
        c = np.sort(data.recommended_counts(self.k)).astype(np.float64)
        n, total = c.size, c.sum()
        if total == 0:
            return float("nan")
        i = np.arange(1, n + 1, dtype=np.float64)
        return float(((2 * i - n - 1) * c).sum() / (n * total))


# The metrics the evaluator reports at each k, in report order.
LONGTAIL_METRICS: tuple[type[Metric], ...] = (
    Recall, NDCG, MRR, TailRecall, Coverage, TailCoverage, AveragePopularity, Gini,
)
# CRSLab's names for the sample metrics kept in evaluator.rec_metrics (systems read hit@k).
CRSLAB_NAMES: dict[type[SampleMetric], str] = {Recall: "hit", NDCG: "ndcg", MRR: "mrr"}
