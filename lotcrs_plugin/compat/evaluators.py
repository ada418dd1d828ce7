"""The patches of CRSLab's evaluators: numpy scalars as metric values, the embedding metrics
made optional, the conv evaluator's constructor, and tensorboard's runs/ under the output root."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lotcrs_plugin.compat.imports import fasttext_available
from lotcrs_plugin.compat.rebind import _is_patched, _mark, _module, _patch_method


# ---- Metric.as_number ------------------------------------------------------------------------

def _patch_as_number() -> None:
    """Symptom: AssertionError in Metric.as_number for numpy scalars (GreedyMatch,
    EmbeddingAverage and VectorExtrema return numpy.float32). numpy scalars are converted with
    .item() like tensors."""
    import numpy as np
    import torch

    base = _module("crslab.evaluator.metrics.base")

    def make(original: Callable) -> Callable:
        def as_number(cls, obj):
            if isinstance(obj, (torch.Tensor, np.generic)):
                obj = obj.item()
            assert isinstance(obj, (int, float)), f"not a number: {obj!r}"
            return obj
        return as_number

    _patch_method(base.Metric, "as_number", make, "as_number")


# ---- embedding metrics optional --------------------------------------------------------------

_embedding_warned = False


def _warn_embedding_once(reason: str) -> None:
    global _embedding_warned
    if _embedding_warned:
        return
    _embedding_warned = True
    from loguru import logger

    logger.warning(f"embedding metrics (greedy, average, extreme) are skipped: {reason}")


def _patch_embedding_metrics() -> None:
    """Symptom: the conv and standard evaluators crash at construction without the fasttext
    package (ImportError) or when the fastText vectors cc.<lang>.300.bin cannot be downloaded
    (no network: CRSLab retries for 15 s, then RuntimeError). Now the evaluator is built
    without embeddings, one warning names why, and gen_evaluate computes every other metric
    (f1, bleu@k, dist@k) while greedy/average/extreme are left out."""
    from nltk import ngrams

    metrics = _module("crslab.evaluator.metrics")
    classes = [_module("crslab.evaluator.standard").StandardEvaluator,
               _module("crslab.evaluator.conv").ConvEvaluator]

    def make_load(original: Callable) -> Callable:
        def _load_embedding(self, language):
            self.ft = None
            if not fasttext_available():
                _warn_embedding_once("the fasttext package is not installed (pip install fasttext)")
                return
            try:
                original(self, language)
            except Exception as exc:  # download refused or failed, unreadable file
                self.ft = None
                _warn_embedding_once(f"cannot load the fastText vectors cc.{language}.300.bin: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return _load_embedding

    def make_gen(original: Callable) -> Callable:
        def gen_evaluate(self, hyp, refs):
            if getattr(self, "ft", None) is not None:
                return original(self, hyp, refs)
            if hyp:  # CRSLab's gen_evaluate without the embedding metrics
                self.gen_metrics.add("f1", metrics.F1Metric.compute(hyp, refs))
                for k in range(1, 5):
                    self.gen_metrics.add(f"bleu@{k}", metrics.BleuMetric.compute(hyp, refs, k))
                    for token in ngrams(hyp, k):
                        self.dist_set[f"dist@{k}"].add(token)
                self.dist_cnt += 1
        return gen_evaluate

    for cls in classes:
        _patch_method(cls, "_load_embedding", make_load, "embedding_metrics")
        _patch_method(cls, "gen_evaluate", make_gen, "embedding_metrics")


def _patch_conv_evaluator() -> None:
    """Symptom: `evaluator: conv` fails: get_evaluator calls ConvEvaluator(language,
    tensorboard=...), but its __init__ takes only tensorboard (`got multiple values for
    argument 'tensorboard'`); it also never loads the embedding that its gen_evaluate reads
    (`no attribute 'ft'`). __init__ now takes (language=None, tensorboard=False) and loads the
    embedding like StandardEvaluator does."""
    cls = _module("crslab.evaluator.conv").ConvEvaluator

    def make(original: Callable) -> Callable:
        def __init__(self, language=None, tensorboard=False):
            original(self, tensorboard=tensorboard)
            self.ft = None
            if language is not None:
                self._load_embedding(language)
        return __init__

    _patch_method(cls, "__init__", make, "conv_evaluator")


# ---- tensorboard runs/ into the output root --------------------------------------------------

def _patch_tensorboard_dir() -> None:
    """Symptom: with tensorboard on, the evaluators create ./runs/<time> in the current
    directory (SummaryWriter(log_dir='runs/...')). The name SummaryWriter in the evaluator
    modules is bound to a factory that puts a relative log_dir under
    lotcrs_plugin.paths.active_layout().runs."""
    for name in ("crslab.evaluator.standard", "crslab.evaluator.conv", "crslab.evaluator.rec"):
        module = _module(name)
        original = module.SummaryWriter
        if _is_patched(original):
            continue

        def make(original_cls: type) -> Callable:
            def SummaryWriter(log_dir=None, *args, **kwargs):
                from lotcrs_plugin.paths import active_layout

                if log_dir is not None and not os.path.isabs(str(log_dir)):
                    rel = Path(log_dir)
                    if rel.parts and rel.parts[0] == "runs":
                        rel = Path(*rel.parts[1:])
                    log_dir = str(active_layout().runs / rel)
                return original_cls(log_dir, *args, **kwargs)
            return SummaryWriter

        module.SummaryWriter = _mark(make(original), "tensorboard_dir")
