"""Make crslab 0.1.2 work on Python 3.11/3.12, torch >= 2.1 and transformers 5.x.

No CRSLab file is edited: each patch replaces one attribute in a loaded crslab module.
Every patch is idempotent (applying twice changes nothing) and names the symptom it cures.
:func:`apply` imports crslab's data, model, system and evaluator packages in the order the
patches need.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

_applied = False


class _HFAdamW:  # placeholder type; replaced by the real class in _adamw_class()
    pass


def _adamw_class() -> type:
    """transformers.AdamW as CRSLab knew it: torch's AdamW with the old HF defaults."""
    import torch

    class AdamW(torch.optim.AdamW):
        # transformers < 4.x AdamW defaults: no weight decay, eps 1e-6
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                     correct_bias=True, **kwargs):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    AdamW.__module__ = __name__
    return AdamW


def _import_system_with_adamw() -> None:
    """Symptom: `cannot import name 'AdamW' from 'transformers'` when importing crslab.system.

    transformers 5 removed AdamW. crslab.system.base imports it at module load, so it is lent
    to the transformers module for that import only, then taken back. It must be set after
    crslab.model is imported: importing a model module replaces sys.modules['transformers'].
    """
    if "crslab.system.base" in sys.modules:
        return
    importlib.import_module("crslab.model")
    import transformers

    had = "AdamW" in vars(transformers)
    if not had:
        transformers.AdamW = _adamw_class()
    try:
        importlib.import_module("crslab.system")
    finally:
        if not had:
            try:
                delattr(transformers, "AdamW")
            except AttributeError:
                pass


def _fasttext_optional() -> None:
    """Symptom: `ModuleNotFoundError: No module named 'fasttext'` when importing crslab.evaluator.

    fasttext only serves the embedding metrics of generated text; without it, a stand-in module
    lets crslab import, and loading the embedding raises, which the evaluator patch turns into
    a warning and skipped metrics.
    """
    try:
        import fasttext  # noqa: F401
    except ImportError:
        stub = types.ModuleType("fasttext")
        stub.__lotcrs_stub__ = True

        def load_model(path: str):
            raise ImportError("fasttext is not installed")

        stub.load_model = load_model
        sys.modules["fasttext"] = stub


def apply() -> None:
    """Apply every patch (idempotent)."""
    global _applied
    if _applied:
        return
    _fasttext_optional()
    importlib.import_module("crslab.data")
    _import_system_with_adamw()
    importlib.import_module("crslab.evaluator")
    _applied = True
