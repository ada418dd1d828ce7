"""The long-tail evaluator for CRSLab (``evaluator: longtail`` plus an optional ``longtail:``
block, see :class:`~lotcrs_plugin.evaluator.config.LongTailConfig`).

Importing this package is light; :func:`install` (and the names below, on first use) import
CRSLab through :mod:`lotcrs_plugin.compat`.
"""

from __future__ import annotations

import importlib
from typing import Any

EVALUATOR_NAME = "longtail"

_LAZY = {
    "LongTailEvaluator": "lotcrs_plugin.evaluator.longtail",
    "SystemAwareEvaluator": "lotcrs_plugin.evaluator.hook",
    "LongTailConfig": "lotcrs_plugin.evaluator.config",
    "Catalog": "lotcrs_plugin.evaluator.catalog",
    "RankData": "lotcrs_plugin.evaluator.metrics",
    "format_report": "lotcrs_plugin.evaluator.report",
}


def install() -> None:
    """Register ``longtail`` in CRSLab's Evaluator_register_table and install the hook that
    builds system-aware evaluators with their system (idempotent)."""
    from lotcrs_plugin.evaluator.hook import install_hook
    from lotcrs_plugin.evaluator.longtail import LongTailEvaluator
    from lotcrs_plugin.registry import register_evaluator

    install_hook()
    register_evaluator(EVALUATOR_NAME, LongTailEvaluator)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EVALUATOR_NAME", "install", *_LAZY]
