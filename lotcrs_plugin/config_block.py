"""One check for the config blocks that are dataclasses with ``from_dict`` (``lotcrs:``,
``retrieval:``, ``rerank:``, ``smoothing:``, ...): an unknown key or a wrong value gets one line.

:func:`typed_values` is what every block's ``from_dict`` calls: it refuses an unknown key
(:func:`check_known_keys`: the known keys and a "did you mean" hint), checks each value against its
default's type, and runs the block's own :data:`Check` for the keys whose values are not one type
(built from :func:`number`, :func:`integer`, :func:`one_of`, ...)."""

from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lotcrs_plugin.errors import UserError

KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}

Check = Callable[[str, Any], Any]
"""A key's own check in ``typed_values(special=...)``: (key, value) -> the value to keep (converted,
e.g. a list to a tuple), or UserError "key 'K' must be ..., not V"."""


def check_known_keys(cls: type, d: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
    """``d`` as a new dict; UserError unless it is a mapping whose keys are all fields of ``cls``
    (the line lists the known keys and the closest one)."""
    if d is not None and not isinstance(d, Mapping):
        raise UserError(f"{where}the block must be a mapping of keys to values, not {d!r}")
    d = dict(d or {})
    known = [f.name for f in fields(cls)]
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{where}unknown key '{key}'; known keys: {', '.join(known)}{hint}")
    return d


def typed_values(cls: type, d: Mapping[str, Any] | None, special: Mapping[str, Check] | None = None,
                 where: str = "") -> dict[str, Any]:
    """``d`` checked against the fields of ``cls``: every key known, every value of its default's
    type (an integer is taken for a float, a bool never for a number), or, for a key of ``special``,
    what its check returns. A field whose default is not an int, float, str or bool needs a check."""
    special = special or {}
    d = check_known_keys(cls, d, where)
    defaults = cls()
    for f in fields(cls):
        if f.name not in special and type(getattr(defaults, f.name)) not in KINDS:
            raise TypeError(f"{cls.__name__}.{f.name}: a {type(getattr(defaults, f.name)).__name__} "
                            f"default needs a check in typed_values' special")
    for key, value in d.items():
        if key in special:
            try:
                d[key] = special[key](key, value)
            except UserError as err:
                raise UserError(f"{where}{err}") from None
            continue
        want = type(getattr(defaults, key))
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            d[key], ok = float(value), True
        if not ok:
            raise UserError(f"{where}key '{key}' must be {KINDS[want]}, not {value!r}")
    return d


def is_int(v: Any) -> bool:
    """An integer value of a hand-checked key (numpy's too), never a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A number value of a hand-checked key, never a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def wrong(key: str, value: Any, what: str) -> UserError:
    """The one line of a refused value: "key 'K' must be WHAT, not VALUE"."""
    return UserError(f"key '{key}' must be {what}, not {value!r}")


def _any(_: Any) -> bool:
    return True


def number(what: str = "a number", ok: Callable[[float], bool] = _any, *,
           also: Sequence[Any] = ()) -> Check:
    """A number (not a bool) for which ``ok`` holds, kept as a float; a value of ``also`` (e.g.
    "auto") is kept as it is."""
    def check(key: str, value: Any) -> Any:
        if isinstance(value, str) and value in also:
            return value
        if not is_number(value) or not ok(value):
            raise wrong(key, value, what)
        return float(value)

    return check


def integer(what: str = "an integer", ok: Callable[[int], bool] = _any, *, null: bool = False) -> Check:
    """An integer (numpy's too, never a bool) for which ``ok`` holds; None too when ``null``."""
    def check(key: str, value: Any) -> Any:
        if value is None and null:
            return None
        if not is_int(value) or not ok(value):
            raise wrong(key, value, what)
        return value

    return check


def _list_of(what: str, member: Callable[[Any], bool], convert: Callable[[Any], Any],
             ok: Callable[[Any], bool]) -> Check:
    def check(key: str, value: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or not value or not all(member(v) and ok(v) for v in value):
            raise wrong(key, value, what)
        return tuple(convert(v) for v in value)

    return check


def number_list(what: str, ok: Callable[[float], bool] = _any) -> Check:
    """A non-empty list of numbers for which ``ok`` holds, as a tuple of floats."""
    return _list_of(what, is_number, float, ok)


def integer_list(what: str, ok: Callable[[int], bool] = _any) -> Check:
    """A non-empty list of integers for which ``ok`` holds, as a tuple of ints."""
    return _list_of(what, is_int, int, ok)


def one_of(choices: Sequence[str], what: str = "") -> Check:
    """One of ``choices`` (the line lists them, or says ``what``)."""
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise wrong(key, value, what or "one of " + ", ".join(choices))
        return value

    return check


def string(what: str = "a string", *, null: bool = False) -> Check:
    """A string; None too when ``null``."""
    def check(key: str, value: Any) -> Any:
        if not (isinstance(value, str) or (value is None and null)):
            raise wrong(key, value, what)
        return value

    return check


def mapping(what: str = "a mapping") -> Check:
    """A mapping, as a new dict."""
    def check(key: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise wrong(key, value, what)
        return dict(value)

    return check


def finite_non_negative(v: float) -> bool:
    """0 <= v < inf (NaN fails)."""
    return 0 <= v < math.inf


positive_number = number("a number > 0", lambda v: v > 0)
non_negative_number = number("a number >= 0", finite_non_negative)
positive_int = integer("an integer > 0", lambda v: v > 0)


def requirement(cfg: Any, where: str = "") -> Callable[[bool, str, str], None]:
    """``need(ok, key, what)`` for a block's value checks: unless ``ok``, one UserError line
    "<where>key 'K' must be WHAT, not VALUE" (VALUE read off ``cfg``)."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise UserError(f"{where}key '{key}' must be {what}, not {getattr(cfg, key)!r}")

    return need


__all__ = ["Check", "check_known_keys", "finite_non_negative", "integer", "integer_list", "is_int", "is_number",
           "mapping", "non_negative_number", "number", "number_list", "one_of", "positive_int", "positive_number",
           "requirement", "string", "typed_values", "wrong"]
