"""Where a synthetic dataset lives, generating it once, and the CRSLab dataset ``synthetic`` that
reads it (built on first access: it needs crslab, which the generator does not)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lotcrs_plugin.data.synthetic.config import NAME, SyntheticConfig
from lotcrs_plugin.data.synthetic.generator import generate


def dataset_folder(cfg: SyntheticConfig, dataset_root: str | os.PathLike | None = None) -> Path:
    """Where the dataset for ``cfg`` lives: <dataset root>/synthetic/<key>."""
    if dataset_root is None:
        from lotcrs_plugin.paths import active_layout

        dataset_root = active_layout().dataset
    return Path(dataset_root) / NAME / cfg.key()


def ensure_generated(cfg: SyntheticConfig | None = None,
                     dataset_root: str | os.PathLike | None = None) -> Path:
    """The folder of the dataset for ``cfg``, generated first if absent (written to a temporary
    sibling, then renamed, so that a reader never sees a half-written folder)."""
    cfg = cfg or SyntheticConfig()
    final = dataset_folder(cfg, dataset_root)
    if (final / "dataset.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate(cfg, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            if (final / "dataset.json").is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # an incomplete folder left by hand: replace it
                shutil.rmtree(final)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _dataset_class() -> type:
    """SyntheticDataset is built on first access: it needs crslab (through
    lotcrs_plugin.data.processed), which this module's generator does not."""
    from lotcrs_plugin.data.processed import ProcessedDataset

    class SyntheticDataset(ProcessedDataset):
        """CRSLab dataset ``synthetic``: generated on first use from the config block
        ``synthetic:`` (see :class:`SyntheticConfig`), then read like any processed folder."""

        dataset_name = NAME

        def resolve_folder(self, opt) -> Path:
            return ensure_generated(SyntheticConfig.from_dict(opt.get(NAME, None)))

    SyntheticDataset.__module__ = __name__
    SyntheticDataset.__qualname__ = "SyntheticDataset"
    return SyntheticDataset


def __getattr__(name: str) -> Any:
    if name == "SyntheticDataset":
        cls = _dataset_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
