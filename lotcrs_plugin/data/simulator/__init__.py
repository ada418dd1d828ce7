"""The balanced-data simulator of LOT-CRS (pipeline step 1): for every catalog item, never
mentioned ones included, the same number of simulated conversations that lead to it.

    from lotcrs_plugin.data.simulator import SimulationConfig, simulate, iter_simulated
    folder = simulate("<root>/data/dataset/redial", SimulationConfig(per_item=20))
    for dialog in iter_simulated(folder): ...   # {conv_id, dialog: [turn, ...]} as train_data.json

Modules: config (the `simulation:` block), templates (built-in set, template files), mining
(templates from the real training dialogs), mentions (names and genre words in a text),
threads (attribute / related-item paths to the target), render (JSON assembly), core
(generation, statistics, cache), reading (the simulated folder), consistency (do the dialogs keep
to their threads?). Importing this package
imports only the config; numpy and the rest load on first use.
"""

from __future__ import annotations

from typing import Any

from lotcrs_plugin.data.simulator.config import DEFAULT_KIND_MIX, SimulationConfig

_LAZY = {
    "simulate": "core", "find_simulated": "core", "iter_simulated": "core", "load_simulated": "core", "load_stats": "core",
    "generate": "core", "gini": "core", "DATA_FILE": "core", "STATS_FILE": "core",
    "Template": "templates", "BUILTIN": "templates", "load_template_file": "templates",
    "mine_templates": "mining", "ThreadChecker": "consistency", "NameMatcher": "mentions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["DEFAULT_KIND_MIX", "SimulationConfig", *_LAZY]
