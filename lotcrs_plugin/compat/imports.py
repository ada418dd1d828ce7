"""The patches needed to import crslab at all: a stand-in fasttext module and transformers.AdamW."""

from __future__ import annotations

import importlib
import sys
import types


# ---- transformers.AdamW ----------------------------------------------------------------------

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


# ---- fasttext optional at import -------------------------------------------------------------

def _fasttext_optional() -> None:
    """Symptom: `ModuleNotFoundError: No module named 'fasttext'` when importing crslab.evaluator.

    fasttext only serves the embedding metrics of generated text; without it, a stand-in module
    lets crslab import, and the ``embedding_metrics`` patch skips those metrics.
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


def fasttext_available() -> bool:
    """Whether a real fasttext module is importable (not the stand-in of :func:`_fasttext_optional`)."""
    try:
        module = importlib.import_module("fasttext")
    except ImportError:
        return False
    return not getattr(module, "__lotcrs_stub__", False)
