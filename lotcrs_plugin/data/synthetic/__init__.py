"""The built-in ``synthetic`` dataset: a generated catalog and long-tailed conversations.

Nothing is downloaded. A catalog of items with generated names and attributes (genres and
people as director / star / writer) becomes an entity KG; conversations alternate Seeker and
Recommender turns built from small English templates that mention items, genres, people and
mood words; item mentions follow a Zipf-shaped popularity, so a few head items get most
mentions, as in ReDial. As in real CRS data, what the seeker asks for decides what is recommended:
the seeker turn before each recommendation names a genre and a person of the recommended item
(the pair of its attributes that fewest catalog items share, most often that item alone), so a model that
knows the items' attributes can find tail items from the context. The result is written in the processed layout (docs/DATA_LAYOUT.md) to
``<root>/data/dataset/synthetic/<key>/``, where ``key`` hashes the settings, and read back by
:class:`lotcrs_plugin.data.processed.ProcessedDataset`.

Sampling is vectorised numpy; per utterance the only Python work is one ``str.format`` of a
precompiled JSON template, so 100k items x 1M conversations stay feasible. The same settings
give byte-identical files.

Config block (all keys optional)::

    synthetic:
      n_items: 200
      n_conversations: 0        # 0: 3 per item, at least 600 (600 for 200 items)
      turns: 8
      zipf_exponent: 1.0
      n_genres: 12
      n_people: 150
      valid_fraction: 0.1
      test_fraction: 0.1
      seed: 0
"""

from __future__ import annotations

from typing import Any

from lotcrs_plugin.data.synthetic import dataset
from lotcrs_plugin.data.synthetic.config import NAME, SyntheticConfig
from lotcrs_plugin.data.synthetic.dataset import dataset_folder, ensure_generated
from lotcrs_plugin.data.synthetic.generator import generate
from lotcrs_plugin.data.synthetic.templates import tokenize
from lotcrs_plugin.data.synthetic.words import GENRES, MAX_ITEMS, MAX_PEOPLE

__all__ = ["GENRES", "MAX_ITEMS", "MAX_PEOPLE", "NAME", "SyntheticConfig", "SyntheticDataset", "dataset_folder",
           "ensure_generated", "generate", "tokenize"]


def __getattr__(name: str) -> Any:
    if name == "SyntheticDataset":  # built on first access, in lotcrs_plugin.data.synthetic.dataset
        return dataset.SyntheticDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
