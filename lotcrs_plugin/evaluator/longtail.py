"""The long-tail evaluator (``evaluator: longtail``): CRSLab's recommendation metrics plus
coverage, tail coverage, tail recall, average popularity and the Gini index, for any system.

CRSLab's systems call ``rec_evaluate(rank, label)`` once per sample with the top-50 list and the
target, both positions in ``side_data['item_entity_ids']`` (KBRD, KGSF, ReDial, TG-ReDial,
INSPIRED); TG-ReDial's ``policy_evaluate`` passes topic ids through the same method, which
:meth:`LongTailEvaluator.attach` marks so that topics never reach the item metrics. Samples are
buffered and scored as arrays; ``rec_metrics`` (CRSLab's hit@k, ndcg@k, mrr@k, read by the
systems' early stopping) is brought up to date whenever it is read.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import defaultdict
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from loguru import logger

from lotcrs_plugin import compat

compat.apply()  # before any crslab import

from crslab.evaluator.metrics.base import AverageMetric, Metrics, aggregate_unnamed_reports  # noqa: E402
from crslab.evaluator.metrics.gen import BleuMetric, F1Metric  # noqa: E402
from crslab.evaluator.utils import nice_report  # noqa: E402

from lotcrs_plugin.errors import UserError  # noqa: E402
from lotcrs_plugin.evaluator.catalog import Catalog, find_in_side_data, load_item_stats  # noqa: E402
from lotcrs_plugin.evaluator.buckets import popularity_histogram  # noqa: E402
from lotcrs_plugin.evaluator.config import LongTailConfig  # noqa: E402
from lotcrs_plugin.evaluator.hook import SystemAwareEvaluator  # noqa: E402
from lotcrs_plugin.evaluator.metrics import CRSLAB_NAMES, LONGTAIL_METRICS, RankData  # noqa: E402
from lotcrs_plugin.evaluator.report import format_report  # noqa: E402

CRSLAB_KS = (1, 10, 50)  # CRSLab's systems read rec_metrics['hit@1'] and ['hit@50']
SUBSET_ALL = "all"


class _Metrics(Metrics):
    """CRSLab's Metrics with one more operation: replace a value (for dist@k)."""

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value


class _Chunk:
    """Samples already mapped to catalog positions."""

    __slots__ = ("ranks", "labels", "lengths", "flags")

    def __init__(self, ranks: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
                 flags: dict[str, np.ndarray]):
        self.ranks, self.labels, self.lengths, self.flags = ranks, labels, lengths, flags


class LongTailEvaluator(SystemAwareEvaluator):
    """Recommendation metrics over the catalog and its long tail, for any CRSLab system.

    Args:
        catalog: the items in the order of the system's item list, with popularity and tail.
        config: the ``longtail:`` block (tail definition, cut-offs).
        index_space: "position" (ranks and labels are positions in the catalog) or "entity"
            (entity ids).
        tensorboard: write non-test reports to ``<root>/runs`` (skipped with a warning when
            tensorboard is not installed).

    Attributes:
        rec_metrics, gen_metrics, optim_metrics: CRSLab ``Metrics`` as the systems expect.
        last_report: the dict of the latest :meth:`report` that saw item samples, else None
            (see :meth:`report`).
    """

    def __init__(self, catalog: Catalog, config: LongTailConfig | None = None, *,
                 index_space: str = "position", tensorboard: bool = False):
        super().__init__()
        if index_space not in ("position", "entity"):
            raise UserError(f"longtail: index_space must be 'position' or 'entity', not {index_space!r}")
        self.catalog = catalog
        self.config = config or LongTailConfig()
        self.index_space = index_space
        self.tensorboard = tensorboard
        self._writer = None
        self.optim_metrics = Metrics()
        self._rec_metrics = _Metrics()
        self._gen_metrics = _Metrics()
        self.dist_set: defaultdict[str, set] = defaultdict(set)
        self.dist_cnt = 0
        self._rows: list[Sequence[int]] = []  # per-sample calls, not yet scored
        self._row_labels: list[int] = []
        self._row_flags: list[Mapping[str, bool] | None] = []
        self._chunks: list[_Chunk] = []
        self._policy_rows: list[Sequence[int]] = []
        self._policy_labels: list[int] = []
        self._scope: str | None = None
        self._flags: dict[str, np.ndarray] | None = None
        self._flag_cursor = 0
        self._flag_len = 0
        self.last_report: dict[str, Any] | None = None

    # ---- construction from a system ---------------------------------------------------------

    @classmethod
    def from_system(cls, system: Any, tensorboard: bool = False) -> "LongTailEvaluator":
        """Build from the system's opt (``longtail:`` block), side_data and class.

        The catalog is side_data['item_entity_ids'] (side_data['rec'][...] for systems with
        separate models); popularity comes from the block's ``item_stats`` file, else
        side_data['item_stats'], else ``<root>/data/dataset/<dataset>/item_stats.json``.
        """
        opt = system.opt
        try:
            config = LongTailConfig.from_dict(opt.get("longtail") or {})
        except UserError as err:
            raise UserError(f"config block 'longtail': {err}") from None
        side_data = getattr(system, "side_data", None)
        item_ids = find_in_side_data(side_data, "item_entity_ids")
        if item_ids is None:
            raise UserError(f"longtail: dataset '{opt.get('dataset')}' gives no item list "
                            f"(side_data['item_entity_ids']); the long-tail evaluator needs a recommender dataset")
        stats, source = _item_stats(config, side_data, opt.get("dataset"))
        catalog = Catalog.build(item_ids, stats, config, source)
        index_space = config.index_space
        if index_space == "auto":
            index_space = getattr(type(system), "rec_index_space", "position")
        return cls(catalog, config, index_space=index_space, tensorboard=tensorboard)

    def attach(self, system: Any) -> None:
        """Route TG-ReDial-style ``policy_evaluate`` (topic ranks) away from the item metrics."""
        method = getattr(system, "policy_evaluate", None)
        if method is None or getattr(method, "_lotcrs_policy_scope", False):
            return

        @functools.wraps(method)
        def policy_evaluate(*args, **kwargs):
            with self.scope("policy"):
                return method(*args, **kwargs)

        policy_evaluate._lotcrs_policy_scope = True
        system.policy_evaluate = policy_evaluate  # an instance attribute: the class is untouched

    # ---- input ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self, name: str | None) -> Iterator[None]:
        """Within ``scope("policy")``, rec_evaluate scores non-item ranks (topics) with CRSLab's
        hit/ndcg/mrr only, as CRSLab does; they never reach the catalog metrics."""
        previous, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = previous

    @contextlib.contextmanager
    def sample_flags(self, **flags: Any) -> Iterator[None]:
        """Flags for the next B samples that a system passes one by one to rec_evaluate.

        ``with evaluator.sample_flags(unmentioned=mask): system.rec_evaluate(scores, labels)``
        gives the i-th rec_evaluate call inside the block ``mask[i]``; each flag becomes a
        subset reported on its own. Every flag array must have the same length B, and the block
        must make exactly B calls.
        """
        arrays = {name: _as_bool(v) for name, v in flags.items()}
        _check_subset_names(arrays)
        lengths = {a.shape[0] for a in arrays.values()}
        if len(lengths) > 1:
            raise ValueError(f"sample_flags: flag arrays differ in length: {sorted(lengths)}")
        if self._flags is not None:
            raise RuntimeError("sample_flags blocks cannot be nested")
        self._flags, self._flag_cursor = arrays, 0
        self._flag_len = lengths.pop() if lengths else 0
        try:
            yield
            if arrays and self._flag_cursor != self._flag_len:
                raise ValueError(f"sample_flags: {self._flag_len} flags given but rec_evaluate was called "
                                 f"{self._flag_cursor} times")
        finally:
            self._flags = None

    def rec_evaluate(self, ranks: Sequence[int], label: int,
                     subsets: Mapping[str, bool] | None = None) -> None:
        """One sample, as CRSLab's systems call it: its ranked list and its target.

        ``subsets`` flags the sample for named subsets (e.g. {"unmentioned": True}); without
        it, the flags of an open :meth:`sample_flags` block apply.
        """
        if self._scope == "policy":
            self._policy_rows.append(ranks)
            self._policy_labels.append(int(label))
            return
        if subsets is None and self._flags is not None:
            i = self._flag_cursor
            if i >= self._flag_len:
                raise ValueError(f"sample_flags: more than {self._flag_len} rec_evaluate calls in the block")
            subsets = {name: bool(a[i]) for name, a in self._flags.items()}
            self._flag_cursor += 1
        self._rows.append(ranks)
        self._row_labels.append(int(label))
        self._row_flags.append(subsets)

    def rec_evaluate_batch(self, ranks: Any, labels: Any,
                           subsets: Mapping[str, Any] | None = None) -> None:
        """B samples at once: ranks (B, K) and labels (B,) as arrays or tensors, in this
        evaluator's index space; ``subsets`` maps a name to a (B,) bool array."""
        r = _as_int(ranks)
        y = _as_int(labels).reshape(-1)
        if r.ndim != 2 or r.shape[0] != y.shape[0]:
            raise ValueError(f"rec_evaluate_batch: ranks must be (B, K) and labels (B,), got {r.shape} and {y.shape}")
        flags = {name: _as_bool(v) for name, v in (subsets or {}).items()}
        _check_subset_names(flags)
        for name, f in flags.items():
            if f.shape != y.shape:
                raise ValueError(f"rec_evaluate_batch: subset '{name}' has {f.shape[0]} flags for {y.shape[0]} samples")
        self._flush_rows()  # keep sample order
        self._add_chunk(r, y, np.full(y.shape[0], r.shape[1], dtype=np.int64), flags)

    def gen_evaluate(self, hyp: str, refs: list[str]) -> None:
        """f1, bleu@1-4 and dist@1-4 (word n-grams) of a generated response; the embedding
        metrics of CRSLab's 'standard' evaluator (a multi-GB fastText model) are left out."""
        if not hyp:
            return
        self._gen_metrics.add("f1", F1Metric.compute(hyp, refs))
        words = hyp.split()
        for k in range(1, 5):
            self._gen_metrics.add(f"bleu@{k}", BleuMetric.compute(hyp, refs, k))
            # CRSLab 0.1.2 takes n-grams of the string's characters; these are word n-grams
            self.dist_set[f"dist@{k}"].update(zip(*(words[i:] for i in range(k))))
        self.dist_cnt += 1

    # ---- CRSLab's metric tables -------------------------------------------------------------

    @property
    def rec_metrics(self) -> Metrics:
        """CRSLab's hit@k, ndcg@k, mrr@k over the samples seen since the last reset."""
        self._flush_rows()
        self._flush_policy()
        return self._rec_metrics

    @property
    def gen_metrics(self) -> Metrics:
        for k, v in self.dist_set.items():
            self._gen_metrics.set(k, AverageMetric(len(v) / self.dist_cnt))
        return self._gen_metrics

    def reset_metrics(self) -> None:
        self._rec_metrics.clear()
        self._gen_metrics.clear()
        self.optim_metrics.clear()
        self.dist_set.clear()
        self.dist_cnt = 0
        self._rows, self._row_labels, self._row_flags = [], [], []
        self._policy_rows, self._policy_labels = [], []
        self._chunks = []

    # ---- scoring ----------------------------------------------------------------------------

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        rows, labels, row_flags = self._rows, self._row_labels, self._row_flags
        self._rows, self._row_labels, self._row_flags = [], [], []
        ranks, lengths = _pad(rows)
        names = sorted({n for f in row_flags if f for n in f})
        flags = {n: np.fromiter((bool(f.get(n, False)) if f else False for f in row_flags),
                                dtype=bool, count=len(row_flags)) for n in names}
        _check_subset_names(flags)
        self._add_chunk(ranks, np.asarray(labels, dtype=np.int64), lengths, flags)

    def _add_chunk(self, ranks: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
                   flags: dict[str, np.ndarray]) -> None:
        ranks, labels = self._to_positions(ranks, labels)
        chunk = _Chunk(ranks, labels, lengths, flags)
        self._chunks.append(chunk)
        self._add_crslab_metrics(RankData(ranks, labels, lengths, self.catalog))

    def _to_positions(self, ranks: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.catalog.n_items
        if self.index_space == "entity":
            return self.catalog.positions_of(ranks), self.catalog.positions_of(labels)
        # positions: padding is -1; anything at or past the catalog's end means a wrong space
        if ranks.size and int(ranks.max()) >= n or labels.size and int(labels.max()) >= n:
            worst = max(int(ranks.max(initial=-1)), int(labels.max(initial=-1)))
            raise UserError(f"longtail: rec_evaluate got position {worst} but the catalog has {n} items; "
                            f"if this system passes entity ids, set `longtail: {{index_space: entity}}`")
        return ranks, np.where(labels >= 0, labels, -1)

    def _add_crslab_metrics(self, data: RankData) -> None:
        """hit@k, ndcg@k, mrr@k as CRSLab adds them: each sample counts at k when its list
        has at least k entries."""
        for k in sorted(set(CRSLAB_KS) | set(self.config.ks)):
            counted = data.lengths >= k
            if not counted.any():
                continue
            for cls, name in CRSLAB_NAMES.items():
                values = cls(k).sample_values(data)
                self._rec_metrics.add(f"{name}@{k}",
                                      AverageMetric(float(values[counted].sum()), int(counted.sum())))

    def _flush_policy(self) -> None:
        if not self._policy_rows:
            return
        ranks, lengths = _pad(self._policy_rows)
        labels = np.asarray(self._policy_labels, dtype=np.int64)
        self._policy_rows, self._policy_labels = [], []
        # topic ids, not items: scored on their own values, never mapped to the catalog
        self._add_crslab_metrics(RankData(ranks, labels, lengths, self.catalog))

    def rank_data(self) -> RankData | None:
        """Every item sample since the last reset, in catalog positions; None when there is none."""
        self._flush_rows()
        if not self._chunks:
            return None
        width = max(c.ranks.shape[1] for c in self._chunks)
        ranks = np.concatenate([np.pad(c.ranks, ((0, 0), (0, width - c.ranks.shape[1])), constant_values=-1)
                                for c in self._chunks])
        labels = np.concatenate([c.labels for c in self._chunks])
        lengths = np.concatenate([c.lengths for c in self._chunks])
        return RankData(ranks, labels, lengths, self.catalog)

    def subset_flags(self) -> dict[str, np.ndarray]:
        """name -> (N,) bool over the samples of :meth:`rank_data` (False where not given)."""
        self._flush_rows()
        names = sorted({n for c in self._chunks for n in c.flags})
        return {n: np.concatenate([c.flags.get(n, np.zeros(c.labels.shape[0], dtype=bool))
                                   for c in self._chunks]) for n in names}

    def compute(self, data: RankData) -> dict[str, float | None]:
        """Every long-tail metric at every configured k that the lists are long enough for."""
        out: dict[str, float | None] = {}
        for k in self.config.ks:
            if k > data.width:
                continue
            for cls in LONGTAIL_METRICS:
                metric = cls(k)
                out[metric.key] = _json_number(metric.calculate(data))
        return out

    def longtail_report(self, epoch: int = -1, mode: str = "test") -> dict[str, Any] | None:
        """The report dict (see :meth:`report`) of the samples seen since the last reset."""
        data = self.rank_data()
        if data is None:
            return None
        report: dict[str, Any] = {
            "mode": mode,
            "epoch": epoch,
            "index_space": self.index_space,
            "tail": self.catalog.metadata(),
            "ks": [k for k in self.config.ks if k <= data.width],
            **self._part(data),
            "subsets": {},
        }
        for name, mask in self.subset_flags().items():
            report["subsets"][name] = self._part(data.subset(mask))
        report["popularity_buckets"] = popularity_histogram(data, report["ks"])
        return report

    def _part(self, data: RankData) -> dict[str, Any]:
        return {
            "n_samples": data.n_samples,
            "n_tail_samples": int(data.target_is_tail().sum()),
            "metrics": self.compute(data) if data.n_samples else {},
        }

    # ---- report -----------------------------------------------------------------------------

    def report(self, epoch: int = -1, mode: str = "test") -> None:
        """Log CRSLab's tables and the long-tail table; keep the latter in ``last_report``.

        ``last_report`` = {"mode", "epoch", "index_space", "tail": {"definition",
        "count_field", "catalog_size", "tail_size", "tail_max_count", "popularity_source"},
        "ks", "n_samples", "n_tail_samples", "metrics": {"recall@10": ..., ...},
        "subsets": {name: {"n_samples", "n_tail_samples", "metrics"}}, "popularity_buckets":
        {"upper_bounds", "labels", "catalog_items", "targets", "recommended": {k: [...]}} (see
        lotcrs_plugin.evaluator.buckets)}; undefined values
        (e.g. tail recall without a tail target) are None. It is None after a report with no
        item sample (a training epoch, a conversation or policy stage).
        """
        reports = [self.rec_metrics.report(), self.gen_metrics.report(), self.optim_metrics.report()]
        self.last_report = self.longtail_report(epoch, mode)
        text = nice_report(aggregate_unnamed_reports(reports))
        if self.last_report is not None:
            text = (text + "\n" if text else "") + format_report(self.last_report)
        logger.info("\n" + text)
        if self.tensorboard and mode != "test":
            self._write_tensorboard(reports, epoch, mode)

    def _write_tensorboard(self, reports: list[dict], epoch: int, mode: str) -> None:
        writer = self._tensorboard_writer()
        if writer is None:
            return
        for group, task_report in zip(("Recommendation Metrics", "Generation Metrics", "Optimization Metrics"),
                                      reports):
            for name, value in task_report.items():
                writer.add_scalars(f"{group}/{name}", {mode: value.value()}, epoch)
        if self.last_report is not None:
            for name, value in self.last_report["metrics"].items():
                if value is not None:
                    writer.add_scalars(f"Long-tail Metrics/{name}", {mode: value}, epoch)

    def _tensorboard_writer(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                logger.warning(f"[longtail] tensorboard logging is off: {err}")
                self.tensorboard = False
                return None
            from lotcrs_plugin.paths import active_layout

            log_dir = active_layout().runs / time.strftime("longtail-%Y-%m-%d-%H-%M-%S")
            self._writer = SummaryWriter(log_dir=str(log_dir))
        return self._writer


# ---- helpers ---------------------------------------------------------------------------------

def _item_stats(config: LongTailConfig, side_data: Any, dataset: str | None) -> tuple[Mapping, str]:
    if config.item_stats:
        return load_item_stats(config.item_stats), config.item_stats
    stats = find_in_side_data(side_data, "item_stats")
    if stats is not None:
        return stats, "side_data['item_stats']"
    from lotcrs_plugin.paths import active_layout

    path = active_layout().dataset / str(dataset) / "item_stats.json"
    if path.is_file():
        return load_item_stats(path), str(path)
    raise UserError(f"longtail: no item popularity for dataset '{dataset}': side_data has no 'item_stats' and "
                    f"{path} does not exist; import the dataset with `crslab import-data` or set "
                    f"`longtail: {{item_stats: <path to item_stats.json>}}`")


def _pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rank lists as (N, K) padded with -1, and their lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max(initial=0))
    if lengths.size and (lengths == width).all():
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), width), lengths
    out = np.full((len(rows), width), -1, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    out[mask] = np.fromiter((x for r in rows for x in r), dtype=np.int64, count=int(lengths.sum()))
    return out, lengths


def _as_int(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def _as_bool(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=bool).reshape(-1)


def _check_subset_names(flags: Mapping[str, Any]) -> None:
    for name in flags:
        if not isinstance(name, str) or not name or "/" in name or name == SUBSET_ALL:
            raise ValueError(f"subset name {name!r}: use a non-empty name without '/', other than '{SUBSET_ALL}'")


def _json_number(v: float) -> float | None:
    return None if math.isnan(v) else v
