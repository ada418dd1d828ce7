"""Evaluators built with the system: CRSLab builds an evaluator as
``get_evaluator(name, dataset, tensorboard)`` inside ``BaseSystem.__init__``, which gives it no
opt, vocab or side_data. :func:`install_hook` wraps two attributes (no CRSLab file is edited):

- ``BaseSystem.__init__`` records the system under construction (a context variable) and,
  when its evaluator is a :class:`SystemAwareEvaluator`, calls ``evaluator.attach(system)``
  after CRSLab's own ``__init__`` body;
- ``get_evaluator`` (in crslab.evaluator and in crslab.system.base, which copied it) builds a
  registered :class:`SystemAwareEvaluator` subclass with ``cls.from_system(system,
  tensorboard=...)``; every other name goes to CRSLab's function unchanged.

By the time BaseSystem calls get_evaluator it has set opt, vocab, side_data and the
dataloaders, so ``from_system`` can read them.
"""

from __future__ import annotations

import contextvars
import functools
from abc import abstractmethod
from typing import Any

from lotcrs_plugin import compat

compat.apply()  # before any crslab import

import crslab.evaluator as crslab_evaluator  # noqa: E402
import crslab.system.base as crslab_system_base  # noqa: E402
from crslab.evaluator.base import BaseEvaluator  # noqa: E402
from loguru import logger  # noqa: E402

from lotcrs_plugin.errors import UserError  # noqa: E402

_building: contextvars.ContextVar[Any] = contextvars.ContextVar("lotcrs_system_under_construction",
                                                                default=None)


class SystemAwareEvaluator(BaseEvaluator):
    """A CRSLab evaluator that is built from the system that uses it."""

    @classmethod
    @abstractmethod
    def from_system(cls, system: Any, tensorboard: bool = False) -> "SystemAwareEvaluator":
        """Build from ``system.opt``, ``system.vocab``, ``system.side_data`` (and dataloaders)."""

    def attach(self, system: Any) -> None:
        """Called once BaseSystem.__init__ has run (before a subclass's own __init__ lines)."""


def system_under_construction() -> Any:
    """The system whose BaseSystem.__init__ is running, else None."""
    return _building.get()


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        token = _building.set(self)
        try:
            original(self, *args, **kwargs)
        finally:
            _building.reset(token)
        evaluator = getattr(self, "evaluator", None)
        if isinstance(evaluator, SystemAwareEvaluator):
            evaluator.attach(self)

    __init__._lotcrs_hook = True
    return __init__


def _wrap_get_evaluator(original):
    @functools.wraps(original)
    def get_evaluator(evaluator_name, dataset, tensorboard=False):
        cls = crslab_evaluator.Evaluator_register_table.get(evaluator_name)
        if isinstance(cls, type) and issubclass(cls, SystemAwareEvaluator):
            system = _building.get()
            if system is None:
                raise UserError(f"evaluator '{evaluator_name}' is built from a system: create the system, "
                                f"or call {cls.__name__}.from_system(system)")
            evaluator = cls.from_system(system, tensorboard=tensorboard)
            logger.info(f"[Build evaluator {evaluator_name}]")
            return evaluator
        return original(evaluator_name, dataset, tensorboard)

    get_evaluator._lotcrs_hook = True
    return get_evaluator


def install_hook() -> None:
    """Wrap BaseSystem.__init__ and get_evaluator (idempotent)."""
    base = crslab_system_base.BaseSystem
    if not getattr(base.__init__, "_lotcrs_hook", False):
        base.__init__ = _wrap_init(base.__init__)
    for module in (crslab_evaluator, crslab_system_base):
        if not getattr(module.get_evaluator, "_lotcrs_hook", False):
            module.get_evaluator = _wrap_get_evaluator(module.get_evaluator)


def hook_installed() -> bool:
    return bool(getattr(crslab_system_base.BaseSystem.__init__, "_lotcrs_hook", False)
                and getattr(crslab_system_base.get_evaluator, "_lotcrs_hook", False))
