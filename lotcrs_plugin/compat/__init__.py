"""Make crslab 0.1.2 work on Python 3.11/3.12, torch >= 2.1 and transformers 5.x.

No CRSLab file is edited: each patch replaces one attribute (a function, a method, a name a
module imported) in a loaded crslab module (:mod:`lotcrs_plugin.compat.rebind`). Every patch is
idempotent (applying twice changes nothing) and its docstring names the symptom it cures; the
patches live by the part of CRSLab they fix (imports, models, systems, evaluators, resources).
:func:`apply` imports crslab's data, model, system and evaluator packages in the order the
patches need, then applies the patches of :data:`PATCH_NAMES` that are not skipped (argument
``skip`` or the environment variable ``LOTCRS_COMPAT_SKIP=name1,name2``; tests use it to show
each symptom).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable

from lotcrs_plugin.compat.evaluators import (_patch_as_number, _patch_conv_evaluator, _patch_embedding_metrics,
                                             _patch_tensorboard_dir)
from lotcrs_plugin.compat.imports import _fasttext_optional, _import_system_with_adamw, fasttext_available
from lotcrs_plugin.compat.models import (_patch_gpt2_cache, _patch_kbrd_user, _patch_kgsf_copy_mask,
                                         _patch_position_codes, _patch_textcnn_conv1d, _patch_textcnn_vocab,
                                         cache_length, create_position_codes, gpt2_step, kgsf_copy_mask)
from lotcrs_plugin.compat.rebind import ORIGINALS
from lotcrs_plugin.compat.resources import (PLUGIN_DATASET_MARKER, PRETRAINED_KINDS, _patch_pretrained_path,
                                            _patch_safe_build, is_local_resource, pretrained_override,
                                            register_local_resource, safe_build)
from lotcrs_plugin.compat.systems import _patch_backward, _patch_nltk_offline, _patch_plateau, word_tokenize

__all__ = [
    "IMPORT_PATCHES", "ORIGINALS", "PATCH_NAMES", "PLUGIN_DATASET_MARKER", "POST_IMPORT_PATCHES",
    "PRETRAINED_KINDS", "SKIP_ENV_VAR", "applied", "apply", "cache_length", "create_position_codes",
    "fasttext_available", "gpt2_step", "is_local_resource", "kgsf_copy_mask", "pretrained_override",
    "register_local_resource", "safe_build", "word_tokenize",
]

SKIP_ENV_VAR = "LOTCRS_COMPAT_SKIP"

# Patches needed to import crslab at all; applied during the imports.
IMPORT_PATCHES = ("fasttext", "adamw")
# Patches applied once crslab is imported, in this order.
POST_IMPORT_PATCHES = (
    "position_codes",
    "plateau",
    "as_number",
    "gpt2_cache",
    "kbrd_user",
    "embedding_metrics",
    "conv_evaluator",
    "backward",
    "tensorboard_dir",
    "nltk_offline",
    "safe_build",
    "pretrained_path",
    "textcnn_conv1d",
    "textcnn_vocab",
    "kgsf_copy_mask",
)
PATCH_NAMES: tuple[str, ...] = IMPORT_PATCHES + POST_IMPORT_PATCHES

_applied: set[str] = set()


# ---- applying the patches --------------------------------------------------------------------

_POST_IMPORT: dict[str, Callable[[], None]] = {
    "position_codes": _patch_position_codes,
    "plateau": _patch_plateau,
    "as_number": _patch_as_number,
    "gpt2_cache": _patch_gpt2_cache,
    "kbrd_user": _patch_kbrd_user,
    "embedding_metrics": _patch_embedding_metrics,
    "conv_evaluator": _patch_conv_evaluator,
    "backward": _patch_backward,
    "tensorboard_dir": _patch_tensorboard_dir,
    "nltk_offline": _patch_nltk_offline,
    "safe_build": _patch_safe_build,
    "pretrained_path": _patch_pretrained_path,
    "textcnn_conv1d": _patch_textcnn_conv1d,
    "textcnn_vocab": _patch_textcnn_vocab,
    "kgsf_copy_mask": _patch_kgsf_copy_mask,
}


def _skipped(skip: Iterable[str]) -> set[str]:
    names = set(skip)
    env = os.environ.get(SKIP_ENV_VAR, "")
    names |= {n.strip() for n in env.split(",") if n.strip()}
    unknown = names - set(PATCH_NAMES)
    if unknown:
        raise ValueError(f"unknown compat patch(es) {sorted(unknown)}; known: {', '.join(PATCH_NAMES)}")
    return names


def apply(skip: Iterable[str] = ()) -> None:
    """Import crslab and apply every patch not in ``skip`` or $LOTCRS_COMPAT_SKIP (idempotent).

    Skipping 'adamw' or 'fasttext' makes the crslab import fail as it does unpatched (where
    fasttext is not installed).
    """
    skipped = _skipped(skip)
    if "fasttext" not in skipped and "fasttext" not in _applied:
        _fasttext_optional()
        _applied.add("fasttext")
    importlib.import_module("crslab.data")
    importlib.import_module("crslab.model")
    if "adamw" in skipped:
        importlib.import_module("crslab.system")
    elif "adamw" not in _applied:
        _import_system_with_adamw()
        _applied.add("adamw")
    importlib.import_module("crslab.evaluator")
    for name in POST_IMPORT_PATCHES:
        if name in skipped or name in _applied:
            continue
        _POST_IMPORT[name]()
        _applied.add(name)


def applied() -> frozenset[str]:
    """The names of the patches applied in this process."""
    return frozenset(_applied)
