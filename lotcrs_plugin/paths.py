"""Where datasets, checkpoints and logs live: one user-controlled root, never site-packages.

The root is, in order of precedence: an explicit value (``crslab run --output-root`` or the
config key ``output_root``), the environment variable ``LOTCRS_HOME``, else a per-user cache
directory (``$XDG_CACHE_HOME/lotcrs`` or ``~/.cache/lotcrs``).

CRSLab computes its paths from its own file (so data lands in site-packages) and its modules
copy them at import time (``from crslab.config import DATASET_PATH``); :func:`apply_to_crslab`
rewrites the copy in every loaded crslab module.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "LOTCRS_HOME"


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lotcrs"


def resolve_root(explicit: str | os.PathLike | None = None) -> Path:
    """The root in force: explicit value, else $LOTCRS_HOME, else the per-user cache."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return default_root().resolve()


@dataclass(frozen=True)
class Layout:
    """The folders under one root, named after CRSLab's own path constants."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dataset(self) -> Path:
        return self.data / "dataset"

    @property
    def model(self) -> Path:
        return self.data / "model"

    @property
    def pretrain(self) -> Path:
        return self.model / "pretrain"

    @property
    def embedding(self) -> Path:
        return self.data / "embedding"

    @property
    def save(self) -> Path:
        return self.root / "save"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def crslab_constants(self) -> dict[str, str]:
        return {
            "ROOT_PATH": str(self.root),
            "SAVE_PATH": str(self.save),
            "DATA_PATH": str(self.data),
            "DATASET_PATH": str(self.dataset),
            "MODEL_PATH": str(self.model),
            "PRETRAIN_PATH": str(self.pretrain),
            "EMBEDDING_PATH": str(self.embedding),
        }


_active: Layout | None = None


def active_layout() -> Layout:
    """The layout set by the last :func:`apply_to_crslab`, else the one the environment gives."""
    return _active if _active is not None else Layout(resolve_root())


def apply_to_crslab(root: str | os.PathLike | None = None) -> Layout:
    """Point CRSLab's path constants at ``root`` in crslab.config and every loaded crslab module.

    Call after the crslab modules are imported (``lotcrs_plugin.register()`` imports them);
    modules imported later read crslab.config, which is rewritten too.
    """
    global _active
    layout = Layout(resolve_root(root))
    constants = layout.crslab_constants()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "crslab" or name.startswith("crslab.")):
            continue
        for key, value in constants.items():
            if key in vars(module):
                setattr(module, key, value)
    _active = layout
    return layout
