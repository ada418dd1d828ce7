"""One check for the flat config blocks that are frozen dataclasses (``lotcrs:``,
``lotcrs_pretrain:``, ``distributed:``): unknown keys and wrong types get one line each."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any, Callable, Mapping

import numpy as np

from lotcrs_plugin.errors import UserError

KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def typed_values(cls: type, d: Mapping[str, Any] | None,
                 special: Mapping[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    """``d`` checked against the fields of ``cls``: every key known, every value of its default's
    type (an integer is taken for a float, a bool never for a number). ``special`` maps a key to its
    own check, for fields whose values are not one type (e.g. true, false or auto)."""
    d = dict(d or {})
    known = [f.name for f in fields(cls)]
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown key '{key}'; known keys: {', '.join(known)}{hint}")
    defaults = cls()
    for key, value in d.items():
        if special and key in special:
            special[key](value)
            continue
        want = type(getattr(defaults, key))
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            d[key], ok = float(value), True
        if not ok:
            raise UserError(f"key '{key}' must be {KINDS[want]}, not {value!r}")
    return d


def is_int(v: Any) -> bool:
    """An integer value of a hand-checked key (numpy's too), never a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A number value of a hand-checked key, never a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)




def requirement(cfg: Any, where: str = "") -> Callable[[bool, str, str], None]:
    """``need(ok, key, what)`` for a block's value checks: unless ``ok``, one UserError line
    "<where>key 'K' must be WHAT, not VALUE" (VALUE read off ``cfg``)."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise UserError(f"{where}key '{key}' must be {what}, not {getattr(cfg, key)!r}")

    return need


__all__ = ["is_int", "is_number", "requirement", "typed_values"]
