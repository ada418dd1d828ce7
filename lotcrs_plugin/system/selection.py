"""Best epoch on validation for the recommender stage of any CRSLab system (config block
``selection:``, see :class:`SelectionConfig`).

CRSLab 0.1.2 tests the model of the LAST epoch: its early stopping only counts impatience and
keeps no checkpoint. :func:`attach_selection` wraps three attributes of one system instance (no
CRSLab file or class is changed):

- ``evaluator.reset_metrics`` and ``system.step`` record which (stage, mode) produced the samples
  the evaluator holds;
- ``evaluator.report``: after a validation report ('val' or 'valid', CRSLab uses both) of samples
  that all came from validation steps of the rec stage, the selection metric is read from the
  evaluator; when it is the best so far, a CPU copy of the rec model's state_dict is kept;
- ``system.step``: on the first ``step(stage='rec', mode='test')`` the best state is loaded into
  the model, before the test batch is scored.

So the test pass of the rec stage scores the best-validation epoch's model, and test samples never
reach the score (a report whose samples include any non-validation step is ignored). The model is
``system.rec_model`` (TG-ReDial family, ReDial, INSPIRED), else ``system.model`` (KBRD, KGSF: the
shared model, so their conversation stage then starts from the selected recommender). Ties keep
the earlier epoch. A model without tensors (CRSLab's Popularity counts items in a Python dict) has
nothing to restore; the selection is still recorded, with ``restored: false`` and a note.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from loguru import logger

from lotcrs_plugin.config_block import Check, one_of, string, typed_values
from lotcrs_plugin.errors import UserError

STAGE = "rec"
VALID_MODES = ("val", "valid")  # KGSF/TG-ReDial/INSPIRED say 'val', KBRD/ReDial 'valid'
# name -> where it is read: CRSLab's rec_metrics (every evaluator), the long-tail report
# (`evaluator: longtail` only), or the optimisation metrics (a loss: use `mode: min`).
CRSLAB_NAMES = ("hit", "ndcg", "mrr")
ALIASES = {"recall": "hit"}  # one target per sample: recall@k is CRSLab's hit@k
LONGTAIL_NAMES = ("tail_recall", "coverage", "tail_coverage", "avg_popularity", "gini")
LOSS_NAMES = ("rec_loss",)
_TERM = re.compile(r"^([a-z_]+)@([1-9][0-9]*)$")


@dataclass(frozen=True)
class SelectionConfig:
    """The ``selection:`` block: which validation score picks the epoch whose model is tested.

    enabled: keep the best epoch's model and test it (false: CRSLab's behaviour, the last epoch).
    metric:  a metric name@k, or several joined by '+' (their sum). Names: hit, recall (= hit),
             ndcg, mrr (any evaluator); tail_recall, coverage, tail_coverage, avg_popularity,
             gini (``evaluator: longtail``); rec_loss (no @k). The default hit@1+hit@50 is the
             score CRSLab's own early stopping watches in KGSF, TG-ReDial and INSPIRED.
    mode:    max (higher is better) or min (e.g. rec_loss).
    """

    enabled: bool = True
    metric: str = "hit@1+hit@50"
    mode: str = "max"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SelectionConfig":
        """Validate a ``selection:`` block; UserError names an unknown key or a wrong value."""
        return cls(**typed_values(cls, d, CHECKS))

    def terms(self) -> list[tuple[str, int | None]]:
        return parse_metric(self.metric)


def parse_metric(text: str, key: str = "metric") -> list[tuple[str, int | None]]:
    """'hit@1+hit@50' -> [('hit', 1), ('hit', 50)]; UserError, naming ``key``, for an unknown name
    or a bad k."""
    names = sorted({*CRSLAB_NAMES, *ALIASES, *LONGTAIL_NAMES})
    terms: list[tuple[str, int | None]] = []
    for raw in text.split("+"):
        term = raw.strip()
        if term in LOSS_NAMES:
            terms.append((term, None))
            continue
        m = _TERM.match(term)
        if not m or m.group(1) not in names:
            raise UserError(f"key '{key}': {term!r} is not a metric; use NAME@K (NAME one of "
                            f"{', '.join(names)}) or {', '.join(LOSS_NAMES)}, joined by '+'")
        terms.append((ALIASES.get(m.group(1), m.group(1)), int(m.group(2))))
    return terms


def metric_check(what: str, *, empty: bool = False) -> Check:
    """A config value that :func:`parse_metric` takes, the line naming its key ('' too when
    ``empty``: the block's default metric)."""
    def check(key: str, value: Any) -> str:
        text = string(what)(key, value)
        if text or not empty:
            parse_metric(text, key)
        return text

    return check


CHECKS: dict[str, Check] = {"mode": one_of(("max", "min"), "max or min"),
                            "metric": metric_check("a string like recall@10 or hit@1+hit@50")}


def check_evaluator(evaluator: Any, terms: list[tuple[str, int | None]]) -> None:
    """UserError, before any training, when a metric of ``terms`` needs the long-tail evaluator."""
    needs = [f"{n}@{k}" for n, k in terms if n in LONGTAIL_NAMES]
    if needs and not hasattr(evaluator, "last_report"):
        raise UserError(f"selection: metric {', '.join(needs)} needs `evaluator: longtail` "
                        f"(this run's evaluator is {type(evaluator).__name__}); "
                        f"or select on {', '.join(CRSLAB_NAMES)}@k")


def selection_score(evaluator: Any, terms: list[tuple[str, int | None]]) -> float | None:
    """The sum of the metric ``terms`` (SelectionConfig.terms) over the evaluator's current samples;
    None when one of them is undefined."""
    total = 0.0
    for name, k in terms:
        value = _value(evaluator, name, k)
        if value is None or math.isnan(value):
            return None
        total += value
    return total


def _value(evaluator: Any, name: str, k: int | None) -> float | None:
    if name in LOSS_NAMES:
        table = evaluator.optim_metrics.report()
        key = name
    elif name in CRSLAB_NAMES:
        table = evaluator.rec_metrics.report()
        key = f"{name}@{k}"
    else:
        table = (getattr(evaluator, "last_report", None) or {}).get("metrics", {})
        key = f"{name}@{k}"
    if key not in table:
        raise UserError(f"selection: metric '{key}' is not in the validation report; "
                        f"available: {', '.join(sorted(table)) or 'none'}")
    value = table[key]
    return float(value.value()) if hasattr(value, "value") else (None if value is None else float(value))


def _stage_mode(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """(stage, mode) of a ``system.step(batch, stage, mode)`` call, positional or keyword."""
    stage = kwargs.get("stage", args[1] if len(args) > 1 else None)
    mode = kwargs.get("mode", args[2] if len(args) > 2 else None)
    return stage, mode


def _report_epoch_mode(args: tuple, kwargs: dict) -> tuple[int, str]:
    """(epoch, mode) of an ``evaluator.report(epoch=-1, mode='test')`` call."""
    epoch = kwargs.get("epoch", args[0] if args else -1)
    mode = kwargs.get("mode", args[1] if len(args) > 1 else "test")
    return int(epoch), mode


class BestEpochSelector:
    """Keeps the rec model's state of the best validation epoch and tests it (see the module)."""

    def __init__(self, system: Any, config: SelectionConfig):
        self.system = system
        self.config = config
        self.terms = config.terms()
        self.model = self._rec_model(system)
        self.history: list[dict[str, Any]] = []  # one entry per validation report of the rec stage
        self.best_epoch: int | None = None
        self.best_score: float | None = None
        self._best_state: dict[str, Any] | None = None
        self.restored = False
        self.tested = False
        self.notes: list[str] = []
        self._steps: set[tuple[Any, Any]] = set()  # (stage, mode) of the samples in the evaluator
        self._check_evaluator()

    @staticmethod
    def _rec_model(system: Any) -> Any:
        model = getattr(system, "rec_model", None)
        return model if model is not None else getattr(system, "model", None)

    def _check_evaluator(self) -> None:
        check_evaluator(self.system.evaluator, self.terms)

    # ---- wiring -------------------------------------------------------------------------------

    def attach(self) -> "BestEpochSelector":
        """Wrap the instance attributes (the classes are untouched). Call once per system."""
        system, evaluator = self.system, self.system.evaluator
        step, report, reset = system.step, evaluator.report, evaluator.reset_metrics

        def step_(*args, **kwargs):
            stage, mode = _stage_mode(args, kwargs)
            if stage == STAGE and mode == "test" and not self.tested:
                self.before_test()
            self._steps.add((stage, mode))
            return step(*args, **kwargs)

        def reset_metrics_(*args, **kwargs):
            self._steps.clear()
            return reset(*args, **kwargs)

        def report_(*args, **kwargs):
            out = report(*args, **kwargs)
            epoch, mode = _report_epoch_mode(args, kwargs)
            if mode in VALID_MODES and any(s == STAGE for s, _ in self._steps):
                if all(s == STAGE and m in VALID_MODES for s, m in self._steps):
                    self.observe(epoch)
                else:  # never score a report that mixes in other samples (test, train, other stages)
                    logger.warning(f"[selection] validation report of epoch {epoch} ignored: its samples "
                                   f"came from {sorted(map(str, self._steps))}")
            return out

        system.step = step_
        evaluator.reset_metrics = reset_metrics_
        evaluator.report = report_
        return self

    # ---- scoring ------------------------------------------------------------------------------

    def score(self) -> float | None:
        """The selection metric of the evaluator's current (validation) samples; None if undefined."""
        return selection_score(self.system.evaluator, self.terms)

    def observe(self, epoch: int) -> None:
        """Score the validation report of ``epoch``; keep the model state when it is the best."""
        score = self.score()
        self.history.append({"epoch": epoch, "score": score})
        if score is None:
            logger.warning(f"[selection] epoch {epoch}: {self.config.metric} is undefined on validation; not a candidate")
            return
        better = (self.best_score is None
                  or (score > self.best_score if self.config.mode == "max" else score < self.best_score))
        if better:
            self.best_epoch, self.best_score = epoch, score
            self._best_state = self._snapshot()
        logger.info(f"[selection] epoch {epoch}: validation {self.config.metric} = {score:.4f}; "
                    f"best epoch {self.best_epoch} ({self.best_score:.4f})")

    def _snapshot(self) -> dict[str, Any] | None:
        if self.model is None or not hasattr(self.model, "state_dict"):
            return None
        import copy

        state = {}
        for key, value in self.model.state_dict().items():
            state[key] = (value.detach().to("cpu", copy=True) if hasattr(value, "detach")
                          else copy.deepcopy(value))
        return state

    def before_test(self) -> None:
        """Load the best validation epoch's state (called on the first rec test step)."""
        self.tested = True
        if self.best_epoch is None:
            self.notes.append("no validation score before the test pass: the last model is tested")
            logger.warning(f"[selection] {self.notes[-1]}")
            return
        if not self._best_state:
            self.notes.append(f"the rec model ({type(self.model).__name__}) has no parameters or buffers to "
                              f"restore: the last model is tested")
            logger.warning(f"[selection] {self.notes[-1]}")
            return
        self.model.load_state_dict(self._best_state)
        self.restored = True
        self._best_state = None  # free the copy: the model holds it now
        last = self.history[-1]["epoch"]
        logger.info(f"[selection] testing the model of epoch {self.best_epoch} (validation {self.config.metric} = "
                    f"{self.best_score:.4f}); the last epoch was {last}")

    def summary(self) -> dict[str, Any]:
        """What the results JSON records under ``selection``."""
        return {
            "enabled": True,
            "stage": STAGE,
            "metric": self.config.metric,
            "mode": self.config.mode,
            "selected_epoch": self.best_epoch,
            "validation_score": self.best_score,
            "last_epoch": self.history[-1]["epoch"] if self.history else None,
            "restored": self.restored,
            "history": list(self.history),
            "notes": list(self.notes),
        }


def attach_selection(system: Any, opt: dict) -> BestEpochSelector | None:
    """Attach best-epoch selection to a built CRSLab system as its config says (None when off, or
    when the system selects its best epoch itself: ``owns_selection``, e.g. LOT-CRS, whose
    ``selection_summary()`` the results then record; one mechanism per run, never two)."""
    try:
        config = SelectionConfig.from_dict(opt.get("selection") or {})
    except UserError as err:
        raise UserError(f"config block 'selection': {err}") from None
    if not config.enabled or not hasattr(system, "evaluator") or getattr(system, "owns_selection", False):
        return None
    return BestEpochSelector(system, config).attach()


OFF = {"enabled": False, "note": "selection off: the last epoch's model is tested (CRSLab's behaviour)"}


def selection_summary(selector: BestEpochSelector | None, system: Any = None) -> dict[str, Any]:
    """The results JSON's ``selection`` entry, also when selection is off."""
    if selector is None and getattr(system, "owns_selection", False):
        return system.selection_summary() or dict(OFF)
    if selector is None:
        return dict(OFF)
    return selector.summary()
