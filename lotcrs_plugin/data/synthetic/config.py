"""The synthetic dataset's settings (the config block ``synthetic:``), checked, and their hash that
names the cache folder."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from lotcrs_plugin.config_block import typed_values
from lotcrs_plugin.data.synthetic.words import GENRES, MAX_ITEMS, MAX_PEOPLE
from lotcrs_plugin.errors import UserError

NAME = "synthetic"
# Bump when the generated content changes for the same settings: it is part of the cache key.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the synthetic dataset (the config block ``synthetic:``)."""

    n_items: int = 200           # catalog size (CRSLab needs at least 50)
    n_conversations: int = 0     # dialogs over all splits; 0: 3 per item, at least 600
    turns: int = 8               # utterances per dialog, Seeker first, alternating
    zipf_exponent: float = 1.0   # item popularity ~ 1 / rank**s; 0 is uniform
    n_genres: int = 12
    n_people: int = 150          # directors, stars and writers are drawn from one pool
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        # the conversations grow with the catalog unless set: a 100k-item catalog with 600 dialogs
        # would leave nearly every item unmentioned (resolved here, so the cache key names the count)
        if self.n_conversations == 0 and not isinstance(self.n_items, bool) and isinstance(self.n_items, int):
            object.__setattr__(self, "n_conversations", max(600, 3 * self.n_items))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SyntheticConfig":
        """Validate a ``synthetic:`` block: keys and types, then :meth:`check`'s ranges."""
        values = typed_values(cls, d, where=f"{NAME}: ")
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Range checks; each names the key and the accepted range."""
        if self.n_items < 50:
            raise UserError(f"synthetic.n_items: {self.n_items} is too small; CRSLab ranks top 50, "
                            "so use at least 50")
        if self.n_items > MAX_ITEMS:
            raise UserError(f"synthetic.n_items: at most {MAX_ITEMS}, got {self.n_items}")
        if self.turns < 4:
            raise UserError(f"synthetic.turns: at least 4 utterances per dialog, got {self.turns}")
        if not 3 <= self.n_genres <= len(GENRES):
            raise UserError(f"synthetic.n_genres: between 3 and {len(GENRES)}, got {self.n_genres}")
        if not 3 <= self.n_people <= MAX_PEOPLE:
            raise UserError(f"synthetic.n_people: between 3 and {MAX_PEOPLE}, got {self.n_people}")
        if self.zipf_exponent < 0 or not math.isfinite(self.zipf_exponent):
            raise UserError(f"synthetic.zipf_exponent: a number >= 0, got {self.zipf_exponent}")
        for key in ("valid_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0 < value < 1:
                raise UserError(f"synthetic.{key}: a fraction between 0 and 1, got {value}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise UserError("synthetic.valid_fraction + synthetic.test_fraction must be below 1")
        if self.seed < 0:
            raise UserError(f"synthetic.seed: a non-negative integer, got {self.seed}")
        n_train, n_valid, n_test = self.split_sizes()
        if min(n_train, n_valid, n_test) < 1:
            raise UserError(f"synthetic.n_conversations: {self.n_conversations} gives an empty split "
                            f"(train {n_train}, valid {n_valid}, test {n_test}); use more conversations")

    def split_sizes(self) -> tuple[int, int, int]:
        n_valid = int(round(self.n_conversations * self.valid_fraction))
        n_test = int(round(self.n_conversations * self.test_fraction))
        return self.n_conversations - n_valid - n_test, n_valid, n_test

    def key(self) -> str:
        """A short hash of the settings and the generator version: the cache folder name."""
        blob = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
