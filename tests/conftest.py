"""Shared test set-up: every test runs with LOTCRS_HOME in a temporary folder, so nothing is
written to the user's cache, the current directory or site-packages; and the fixtures several
modules use (one torch thread, the plugin's parts registered, tiny backbones). Helpers that are
not fixtures: support.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lotcrs_home")


@pytest.fixture(autouse=True)
def lotcrs_home(session_home, monkeypatch) -> Path:
    from lotcrs_plugin import paths

    monkeypatch.setenv("LOTCRS_HOME", str(session_home))
    # a run in an earlier test may have made its own root the active one (paths.apply_to_crslab)
    monkeypatch.setattr(paths, "_active", None)
    return session_home


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads stall each other (tiny
    models run several times faster on one). Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def plugin(monkeypatch):
    """The plugin's parts in CRSLab's tables, on the CPU; the LOT-CRS system module."""
    from lotcrs_plugin import registry

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    registry.register_all()
    from lotcrs_plugin.system import lotcrs

    return lotcrs


@pytest.fixture(scope="session")
def backbone_paths(tmp_path_factory) -> dict[str, str]:
    """backbone_path of a tiny model for every backbone (bart and unicrs over a cut GPT-2 BPE)."""
    from support import small_bpe, tiny_bart, tiny_unicrs

    root = tmp_path_factory.mktemp("lotcrs_backbones")
    return {"bert": "builtin:tiny-bert", "bart": str(tiny_bart(root / "bart", small_bpe)),
            "unicrs": str(tiny_unicrs(root / "unicrs", small_bpe))}


@pytest.fixture
def home_with_config_models(tmp_path, monkeypatch) -> Path:
    """An empty home holding, as empty folders, the model folders the shipped configs name under ~
    (made on a user's machine by get-minilm.sh and benchmarks/conversation_check.py, absent on a
    clean one), so that loading those configs checks everything but the weights."""
    from support import shipped_configs

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for path in shipped_configs():
        for folder in re.findall(r"~/[^\s'\"]+", path.read_text(encoding="utf-8")):
            (home / folder[2:]).mkdir(parents=True, exist_ok=True)
    return home
