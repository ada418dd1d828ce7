"""The registry of backbones, chosen by name (config key ``backbone``), and building or reloading one.

A new backbone is ONE module in this package that defines a :class:`~lotcrs_plugin.model.backbones.base.Backbone`
subclass decorated with ``@register_backbone("name")``: the package's modules are imported on the
first lookup. A name taken twice is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.base import DEFAULT_PROMPT, EXPORT_FILE, EXPORT_FORMAT, Backbone
from lotcrs_plugin.model.backbones.inputs import EntityKG
from lotcrs_plugin.registry import class_registrar, import_part_modules

# the modules of this package that hold no backbone
_NOT_BACKBONES = ("base", "inputs", "registry")

_BACKBONES: dict[str, type[Backbone]] = {}
_discovered = False


def register_backbone(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: make a :class:`Backbone` subclass available as ``backbone: name``.

    Refuses a name already taken by another class, and a class that is not a Backbone.
    """
    return class_registrar(_BACKBONES, "backbone", Backbone, name)


def _discover() -> None:
    """Import every module of this package once, so that their decorators run."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import_part_modules(__name__.rpartition(".")[0], Path(__file__).parent, _NOT_BACKBONES)


def backbone_names() -> list[str]:
    _discover()
    return sorted(_BACKBONES)


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name``; UserError listing the valid names otherwise."""
    _discover()
    cls = _BACKBONES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UserError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(_BACKBONES))}")
    return cls


def is_export(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path).expanduser() / EXPORT_FILE).is_file()


def build_backbone(name: str, path: str | Mapping[str, str] | os.PathLike, *, kg: EntityKG | None = None,
                   prompt: str = DEFAULT_PROMPT) -> Backbone:
    """The backbone ``name`` loaded from ``path`` (a Hugging Face name, a local folder, or a folder
    written by :meth:`Backbone.save_pretrained`, whose item tokens come along)."""
    cls = backbone_class(name)
    if is_export(path):
        return load_backbone(path, kg=kg, expect=name, prompt=prompt)
    return cls.from_pretrained(_expand(path), kg=kg, prompt=prompt)


def load_backbone(folder: str | os.PathLike, *, kg: EntityKG | None = None, expect: str | None = None,
                  prompt: str | None = None) -> Backbone:
    """Rebuild a backbone written by :meth:`Backbone.save_pretrained` (item tokens included)."""
    folder = Path(folder).expanduser()
    meta_path = folder / EXPORT_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: not a backbone written by lotcrs_plugin ({e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{meta_path}: \"format\" must be {EXPORT_FORMAT!r}")
    name = meta.get("backbone")
    if expect is not None and name != expect:
        raise UserError(f"{folder} holds a '{name}' backbone, but the config says backbone: {expect}")
    cls = backbone_class(name)
    backbone = cls.from_pretrained(str(folder), kg=kg, prompt=prompt or meta.get("prompt", DEFAULT_PROMPT))
    backbone._restore_items({**meta, "folder": str(folder)})
    backbone._items_added()
    backbone.source = meta.get("source", "")
    return backbone


def _expand(path: Any) -> Any:
    if isinstance(path, Mapping):
        return {k: _expand(v) for k, v in path.items()}
    if isinstance(path, (str, os.PathLike)):
        return os.path.expanduser(str(path))  # a hub name has no "~" and passes unchanged
    raise UserError(f"backbone_path must be a model name or folder, not {path!r}")
