"""Shared test set-up: every test runs with LOTCRS_HOME in a temporary folder, so nothing is
written to the user's cache, the current directory or site-packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LOTCRS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


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
