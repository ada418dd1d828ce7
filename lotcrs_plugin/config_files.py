"""A run config read from its files: ``base:`` inheritance and ``--set`` overrides.

A config may name ``base: other.yaml``, a path relative to the config's own folder; the base may
name its own base (a cycle is refused, with the chain). The config's keys are merged over its
base's, block by block: a mapping over a mapping merges key by key (recursively); anything else
(a list, a scalar, a mapping over a scalar) replaces the base's value. ``key: !unset`` removes a
key that the base sets, so that its default applies.

``--set a.b=VALUE`` changes one key after the files; VALUE is read as YAML (``5`` an integer,
``0.1`` a number, ``true``, ``null``, ``[0, 1]``, a word a string). This module only reads and
merges; :mod:`lotcrs_plugin.config` validates the result.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lotcrs_plugin.errors import UserError

BASE_KEY = "base"


class _Unset:
    """The value of ``key: !unset``: drop the base's value of that key."""

    def __repr__(self) -> str:
        return "!unset"


UNSET = _Unset()


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader plus the ``!unset`` tag."""


def _construct_unset(loader: yaml.SafeLoader, node: yaml.Node) -> _Unset:
    if not isinstance(node, yaml.ScalarNode) or node.value != "":
        raise yaml.constructor.ConstructorError(None, None, "!unset takes no value (write `key: !unset`)",
                                                node.start_mark)
    return UNSET


_Loader.add_constructor("!unset", _construct_unset)
# YAML 1.2 reads 1e-4 as a number; PyYAML (YAML 1.1) would read it as a string, so that
# `lr: 1e-4` or `--set lotcrs.lr=1e-4` failed the type check
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


@dataclass
class ConfigFiles:
    """The merged mapping of a config and the files it came from (the config first, then its base,
    the base's base, ...)."""

    opt: dict
    files: list[str] = field(default_factory=list)


def read_mapping(path: str | os.PathLike) -> dict:
    """The mapping in one YAML file (``base:`` not followed), or UserError naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found; give an existing YAML file with --config")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}{line}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys to values")
    return data


def read_config(path: str | os.PathLike) -> ConfigFiles:
    """The config at ``path`` merged over its chain of bases."""
    return resolve_bases(read_mapping(path), str(path), Path(path).parent)


def resolve_bases(opt: dict, where: str, folder: Path) -> ConfigFiles:
    """``opt`` (read from ``where``; its ``base:`` relative to ``folder``) merged over its bases."""
    layers: list[tuple[str, dict]] = []
    seen: list[Path] = []
    current, data = where, dict(opt)
    while True:
        resolved = Path(current).expanduser().resolve() if current != "<dict>" else None
        if resolved is not None and resolved in seen:
            chain = " -> ".join([name for name, _ in layers] + [current])
            raise UserError(f"{layers[0][0]}: the base chain {chain} is a cycle; one of these files must not "
                            f"name a base")
        if resolved is not None:
            seen.append(resolved)
        base = data.pop(BASE_KEY, None)
        layers.append((current, data))
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise UserError(f"{current}: key 'base' must be the path of another YAML config (relative to "
                            f"this file's folder), not {base!r}")
        here = folder if resolved is None else Path(current).parent
        target = Path(os.path.expanduser(base))
        nxt = os.path.normpath(target if target.is_absolute() else here / target)
        if not Path(nxt).is_file():
            raise UserError(f"{current}: base '{base}' not found (looked for {nxt}); base: is a path relative "
                            f"to the folder of the file that names it")
        current, data = nxt, read_mapping(nxt)
    merged: dict = {}
    for name, layer in reversed(layers):
        merged = merge(merged, layer, name)
    return ConfigFiles(merged, [name for name, _ in layers])


def merge(base: dict, over: dict, where: str = "config", prefix: str = "") -> dict:
    """``over`` merged over ``base`` (neither is changed): mappings key by key, recursively;
    other values replace the base's; ``!unset`` removes the base's key."""
    out = dict(base)
    for key, value in over.items():
        name = f"{prefix}{key}"
        if value is UNSET:
            if key not in out:
                have = ", ".join(map(str, base)) or "none"
                raise UserError(f"{where}: key '{name}' is !unset, but the base does not set it (keys set"
                                f"{' in ' + repr(prefix[:-1]) if prefix else ''}: {have})")
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, where, f"{name}.")
        else:
            out[key] = _without_unset(value, where, name)
    return out


def _without_unset(value: Any, where: str, name: str) -> Any:
    """``value`` itself; UserError where it holds an ``!unset`` that has nothing to remove."""
    if isinstance(value, dict):
        return {k: _without_unset(v, where, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_without_unset(v, where, name) for v in value]
    if value is UNSET:
        raise UserError(f"{where}: key '{name}' is !unset, but the base does not set it")
    return value


def parse_override(expr: str) -> tuple[list[str], Any]:
    """``'lotcrs.epochs=5'`` -> (['lotcrs', 'epochs'], 5): the key path and the value read as YAML."""
    key, sep, text = str(expr).partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"--set {expr!r}: write KEY=VALUE with a dotted key, e.g. --set lotcrs.epochs=5 "
                        f"or --set seed=7")
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"--set {expr}: the value is not valid YAML ({problem}); quote it, e.g. "
                        f"--set {key}='\"{text}\"'") from None
    return [p.strip() for p in parts], value


def _key(node: dict, part: str) -> Any:
    """The key of ``node`` that ``part`` names: a YAML file reads ``10:`` as an integer key."""
    if part not in node and part.lstrip("-").isdigit():
        return int(part)
    return part


def apply_override(opt: dict, expr: str) -> dict:
    """A copy of ``opt`` with the ``--set`` expression ``expr`` applied (a missing block is created,
    a mapping value merges over a mapping as in a config file)."""
    parts, value = parse_override(expr)
    if parts[0] == BASE_KEY:
        raise UserError(f"--set {expr}: 'base' is read from the config files only; name the base in a file")
    out = dict(opt)  # a copy; the mappings on the key's path are copied below before they change
    node = out
    for depth, part in enumerate(parts[:-1]):
        key = _key(node, part)
        child = node.get(key)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise UserError(f"--set {expr}: '{'.'.join(parts[:depth + 1])}' is {child!r}, not a block of keys")
        else:
            child = dict(child)
        node[key] = child
        node = child
    prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    merged = merge(node, {_key(node, parts[-1]): value}, f"--set {expr}", prefix)
    node.clear()
    node.update(merged)
    return out


__all__ = ["BASE_KEY", "UNSET", "ConfigFiles", "apply_override", "merge", "parse_override", "read_config",
           "read_mapping", "resolve_bases"]
