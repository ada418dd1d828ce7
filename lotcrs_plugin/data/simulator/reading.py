"""Reading a simulated folder: its statistics and its dialogs (the format of train_data.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

DATA_FILE = "simulated_data.json"
STATS_FILE = "simulation_stats.json"


def load_stats(folder: str | os.PathLike) -> dict[str, Any]:
    with open(Path(folder) / STATS_FILE, encoding="utf-8") as f:
        return json.load(f)


def iter_simulated(folder: str | os.PathLike) -> Iterator[dict]:
    """The simulated dialogs one by one (the file holds one per line), without loading all."""
    with open(Path(folder) / DATA_FILE, encoding="utf-8") as f:
        for line in f:
            line = line.strip().rstrip(",")
            if line.startswith("{"):
                yield json.loads(line)


def load_simulated(folder: str | os.PathLike) -> list[dict]:
    """All simulated dialogs, in the format of train_data.json."""
    with open(Path(folder) / DATA_FILE, encoding="utf-8") as f:
        return json.load(f)
