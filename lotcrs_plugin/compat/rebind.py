"""How a compat patch replaces one attribute of a loaded crslab module, idempotently.

A CRSLab module that did ``from x import f`` holds its own reference to ``f``: function patches are
applied to every loaded crslab module that still holds the original (:func:`_replace_everywhere`);
method patches wrap the original and mark the wrapper, so applying one twice changes nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

_MARK = "__lotcrs_patch__"
# name -> the crslab function a function patch replaced (for tests and debugging)
ORIGINALS: dict[str, Callable] = {}


def _mark(func: Callable, name: str) -> Callable:
    setattr(func, _MARK, name)
    return func


def _is_patched(obj: Any) -> bool:
    return getattr(obj, _MARK, None) is not None


def _crslab_modules() -> list[types.ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "crslab" or n.startswith("crslab."))]


def _replace_everywhere(original: Any, replacement: Any) -> list[str]:
    """Bind every crslab module attribute that is ``original`` to ``replacement``."""
    hits = []
    for module in _crslab_modules():
        for key, value in list(vars(module).items()):
            if value is original:
                setattr(module, key, replacement)
                hits.append(f"{module.__name__}.{key}")
    return hits


def _module(name: str) -> types.ModuleType:
    """A crslab module by name; some (crslab.model.crs.kgsf.modules) are shadowed by a class or
    function of the same name in their package, so they are read from sys.modules."""
    if name in sys.modules:
        return sys.modules[name]
    return importlib.import_module(name)


def _patch_method(cls: type, attr: str, make: Callable[[Callable], Callable], name: str) -> None:
    """Replace ``cls.attr`` by ``make(original)`` unless already patched (idempotent)."""
    current = cls.__dict__[attr]
    func = current.__func__ if isinstance(current, (classmethod, staticmethod)) else current
    if _is_patched(func):
        return
    new = _mark(make(func), name)
    new.__wrapped_original__ = func
    if isinstance(current, classmethod):
        new = classmethod(new)
    setattr(cls, attr, new)

