"""The ``rerank:`` block: the kNN vote of the balanced simulated store and the tail slots of the
ranked lists, at evaluation (lotcrs_plugin.model.knn, lotcrs_plugin.model.tail_slots,
lotcrs_plugin.system.rerank). Both are beyond the paper: left out, the block changes nothing, and
a reader can follow the paper's path (``retrieval:``) without reading past them. These keys were
part of ``retrieval:`` once; there they are refused with a line naming their new place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lotcrs_plugin.config_block import (Check, finite_non_negative, integer, is_int, is_number, non_negative_number,
                                        number, number_list, one_of, positive_int, positive_number,
                                        typed_values, wrong)
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.system.selection import metric_check

BLOCK = "rerank"


@dataclass(frozen=True)
class RerankConfig:
    """The ``rerank:`` block.

    kNN vote of the balanced store at evaluation (lotcrs_plugin.model.knn; beyond the paper):
      knn_weight:      w in score_i = logit_i + w * log(1 + N * p_knn_i); 0 = off (the paper),
                       "auto" = the value of knn_grid with the best validation selection score.
      knn_grid:        the weights "auto" tries.
      knn_metric:      the validation score "auto" maximises ('' = selection.metric; e.g.
                       recall@10+tail_recall@50 to trade head accuracy for the tail explicitly).
      knn_k:           simulated contexts that vote; knn_temperature: softmax temperature of
                       their cosine similarities; knn_pooling: the frozen encoder's pooling.
      knn_per_item:    simulated contexts kept per item (null: all).
      knn_pretrain:    null: the vote's encoder is the run's pre-trained backbone (else
                       backbone_path); a mapping: keys of ``lotcrs_pretrain`` that differ for a
                       second pre-training whose export is the vote's encoder (its own
                       ``run_name``; e.g. ``dmp_weight: 0`` for a CCA-only retriever).
    Tail slots of the ranked lists at evaluation (lotcrs_plugin.model.tail_slots; beyond the paper):
      tail_slots:      null: off; {cut-off: slots}: the last ``slots`` places of each top-cut-off
                       block (after the previous cut-off) go to the tail items the kNN vote ranks
                       best that the model's list does not hold already; "auto": chosen on
                       validation from ``tail_slots_grid``.
      tail_slots_grid: {cut-off: [slots, ...]}: the combinations "auto" tries.
      tail_slots_metric: the validation score "auto" maximises.
      tail_slots_keep: what the slots may cost on validation: a metric they may not lower (e.g.
                       recall@10), or {metric: share} where each metric may fall by at most that
                       share of its value without slots (e.g. {recall@10: 0, recall@50: 0.05}:
                       no head accuracy in the top 10, at most 5% of the top 50's); '' = none.
      tail_logit_weight: the model's logit weight in the tail ranking (log(1 + N p_knn) +
                       this x logit): orders the tail items the vote does not reach.
    """

    knn_weight: float | str = 0.0
    knn_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    knn_metric: str = ""
    knn_k: int = 100
    knn_temperature: float = 0.05
    knn_pooling: str = "mean"
    knn_per_item: int | None = None
    knn_pretrain: dict[str, Any] | None = None
    tail_slots: dict[int, int] | str | None = None
    tail_slots_grid: dict[int, tuple[int, ...]] = field(default_factory=lambda: {10: (0, 1, 2, 3),
                                                                                  50: (0, 10, 20, 30, 40)})
    tail_slots_metric: str = "recall@10+recall@50+tail_recall@10+tail_recall@50+tail_coverage@50"
    tail_slots_keep: str | dict[str, float] = "recall@10"
    tail_logit_weight: float = 0.001

    @property
    def keep_losses(self) -> dict[str, float]:
        """``tail_slots_keep`` as {metric: the share of its value without slots it may lose}."""
        keep = self.tail_slots_keep
        if isinstance(keep, str):
            return {keep: 0.0} if keep else {}
        return dict(keep)

    @property
    def knn_on(self) -> bool:
        """The vote is built: it scores (knn_weight) or feeds the tail slots."""
        return self.knn_weight == "auto" or float(self.knn_weight) > 0 or self.tail_slots is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RerankConfig":
        """Validate a ``rerank:`` block; UserError names an unknown key or a wrong value."""
        return cls(**typed_values(cls, d, CHECKS))


RERANK_KEYS = frozenset(f.name for f in fields(RerankConfig))  # refused in retrieval:, their old place


TAIL_SLOT_DEPTH = 50  # the lists are the top 50 (CRSLab's deepest cut-off)


def _slot_map(value: Any, key: str, ok: Any, what: str) -> dict[int, Any]:
    """{cut-off: value} with integer cut-offs in 1..TAIL_SLOT_DEPTH (YAML may give them as strings)."""
    if not isinstance(value, dict) or not value:
        raise UserError(f"key '{key}' must be a mapping of cut-off -> {what} (e.g. {{10: 2, 50: 20}}), not {value!r}")
    out = {}
    for cut, v in value.items():
        try:
            c = int(cut)
        except (TypeError, ValueError):
            c = -1
        if not 1 <= c <= TAIL_SLOT_DEPTH or isinstance(cut, bool):
            raise UserError(f"key '{key}': cut-off {cut!r} must be an integer in 1..{TAIL_SLOT_DEPTH}")
        if not ok(v):
            raise UserError(f"key '{key}': cut-off {c} needs {what}, not {v!r}")
        out[c] = v
    return dict(sorted(out.items()))


def _check_slot_room(slots: dict[int, tuple[int, ...]], key: str) -> None:
    prev = 0
    for cut, options in slots.items():
        if max(options) > cut - prev:
            raise UserError(f"key '{key}': {max(options)} slots do not fit between cut-offs {prev} and {cut} "
                            f"({cut - prev} places)")
        prev = cut


_KEEP_METRIC = metric_check("a metric name like recall@10", empty=True)  # '': no metric to keep


def _keep_losses(key: str, value: Any) -> str | dict[str, float]:
    """A metric name ('' = none) or {metric: share in [0, 1)}."""
    if isinstance(value, str):
        return _KEEP_METRIC(key, value)
    shares_ok = isinstance(value, dict) and value and all(
        isinstance(m, str) and m and is_number(v) and 0 <= v < 1 for m, v in value.items())
    if not shares_ok:
        raise UserError(f"key '{key}' must be a metric name like recall@10 or a mapping of metric -> "
                        f"the share of it the slots may cost, in [0, 1) (e.g. {{recall@10: 0, recall@50: 0.05}}), "
                        f"not {value!r}")
    for metric in value:
        _KEEP_METRIC(key, metric)
    return {m: float(v) for m, v in value.items()}


def _pretrain_overrides(key: str, value: Any) -> dict[str, Any] | None:
    if value is not None and (not isinstance(value, dict) or not isinstance(value.get("run_name"), str)
                              or not value["run_name"]):
        raise wrong(key, value, "null or a mapping of lotcrs_pretrain keys with its own run_name "
                                "(e.g. {run_name: my_cca_pretrain, dmp_weight: 0})")
    return None if value is None else dict(value)


def _tail_slots(key: str, value: Any) -> dict[int, int] | str | None:
    if value is None or value == "auto":
        return value
    slots = _slot_map(value, key, lambda v: is_int(v) and v >= 0, "a slot count >= 0")
    _check_slot_room({c: (q,) for c, q in slots.items()}, key)
    return slots


def _tail_slots_grid(key: str, value: Any) -> dict[int, tuple[int, ...]]:
    grid = _slot_map(value, key, lambda v: isinstance(v, (list, tuple)) and v and all(is_int(q) and q >= 0 for q in v),
                     "a non-empty list of slot counts >= 0")
    grid = {c: tuple(sorted(set(int(q) for q in v))) for c, v in grid.items()}
    _check_slot_room(grid, key)
    return grid


CHECKS: dict[str, Check] = {
    "knn_weight": number("a number >= 0 or auto", finite_non_negative, also=("auto",)),
    "knn_grid": number_list("a non-empty list of numbers >= 0", finite_non_negative),
    "knn_metric": metric_check("a metric name like recall@10+tail_recall@50", empty=True),
    "knn_k": positive_int,
    "knn_temperature": positive_number,
    "knn_pooling": one_of(("cls", "mean", "first_last")),
    "knn_per_item": integer("an integer > 0 or null", lambda v: v > 0, null=True),
    "knn_pretrain": _pretrain_overrides,
    "tail_slots": _tail_slots,
    "tail_slots_grid": _tail_slots_grid,
    "tail_slots_metric": metric_check("a metric name like recall@10", empty=True),
    "tail_slots_keep": _keep_losses,
    "tail_logit_weight": non_negative_number,
}


__all__ = ["BLOCK", "RERANK_KEYS", "TAIL_SLOT_DEPTH", "RerankConfig"]
