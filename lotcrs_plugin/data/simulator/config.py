"""The `simulation:` config block: how the balanced simulated dataset is made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lotcrs_plugin.config_block import Check, mapping, requirement, string, typed_values
from lotcrs_plugin.errors import UserError

# Weight of each thread element kind: "item" is a related item (one sharing an attribute with the
# target), the others are attribute kinds of the catalog. Kinds a catalog lacks are ignored.
DEFAULT_KIND_MIX: dict[str, float] = {"item": 1.0, "genre": 1.0, "star": 1.0, "director": 0.5,
                                      "writer": 0.25}
# Weight of each attribute kind as the link between the target and a related item: sharing a
# director says more than sharing a genre. Kinds not named here are not used as links.
DEFAULT_RELATED_VIA: dict[str, float] = {"star": 1.0, "director": 1.0, "writer": 0.5, "genre": 0.25}


@dataclass
class SimulationConfig:
    """Settings of :func:`lotcrs_plugin.data.simulator.simulate`; every field has a default."""

    per_item: int = 20                 # conversations per catalog item (each item the target of exactly this many)
    thread_min_length: int = 2         # thread length, target included (2: one element before the target)
    thread_max_length: int = 4
    kind_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_MIX))
    related_via: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RELATED_VIA))
    mined_template_share: float = 0.5  # share of turns filled from templates mined from train_data.json
    reason_prob: float = 0.8           # chance that the recommendation names a reason (an attribute of the target)
    templates: str | None = None       # extra templates: YAML/JSON file {act: [text, ...]}
    builtin_templates: bool = True     # use the built-in template set
    max_template_tokens: int = 25      # longer mined turns are not used as templates
    mine_max_dialogs: int = 20000      # templates are mined from the first this many training dialogs (0: all)
    seed: int = 0
    cache_dir: str | None = None       # default: <root>/data/simulated
    add_to_train: bool = False         # the CRSLab dataset also appends the simulated dialogs to
                                       # its training split, so any CRSLab model trains on them

    # keys that do not change the generated data (left out of the cache key)
    _NOT_IN_KEY = ("cache_dir", "add_to_train")

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SimulationConfig":
        """Validate a ``simulation:`` block: keys and types, then :meth:`validate`'s ranges."""
        cfg = cls(**typed_values(cls, d, CHECKS, where="simulation: "))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        need = requirement(self, "simulation: ")

        for key, types in (("per_item", int), ("thread_min_length", int), ("thread_max_length", int),
                           ("max_template_tokens", int), ("seed", int), ("mine_max_dialogs", int)):
            need(isinstance(getattr(self, key), types) and not isinstance(getattr(self, key), bool),
                 key, "an integer")
        need(self.per_item >= 1, "per_item", "a positive integer")
        need(1 <= self.thread_min_length <= 16, "thread_min_length", "between 1 and 16 (the target counts)")
        need(self.thread_min_length <= self.thread_max_length <= 16, "thread_max_length",
             f"between thread_min_length ({self.thread_min_length}) and 16")
        need(self.max_template_tokens >= 2, "max_template_tokens", "at least 2")
        need(self.mine_max_dialogs >= 0, "mine_max_dialogs", "0 (all) or a positive integer")
        need(0 <= self.seed < 2 ** 63, "seed", "a non-negative integer")
        for key in ("mined_template_share", "reason_prob"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0, key,
                 "a number between 0 and 1")
        for key in ("kind_mix", "related_via"):
            need(isinstance(getattr(self, key), dict), key, "a mapping of kind to weight")
            for kind, w in getattr(self, key).items():
                if not isinstance(kind, str) or isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                    raise UserError(f"simulation: {key}: '{kind}' must map to a non-negative number, not {w!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def key_dict(self) -> dict[str, Any]:
        """The settings that determine the output (for the cache key)."""
        d = self.to_dict()
        for k in self._NOT_IN_KEY:
            d.pop(k, None)
        d["kind_mix"] = {k: float(v) for k, v in sorted(self.kind_mix.items())}
        d["related_via"] = {k: float(v) for k, v in sorted(self.related_via.items())}
        d["mined_template_share"] = float(self.mined_template_share)
        d["reason_prob"] = float(self.reason_prob)
        if self.mine_max_dialogs == SimulationConfig.mine_max_dialogs:
            # the default: keys (and caches) of datasets with fewer training dialogs stay as they were
            d.pop("mine_max_dialogs")
        return d


_PATH = string("a string (a path)", null=True)
CHECKS: dict[str, Check] = {"kind_mix": mapping(), "related_via": mapping(), "templates": _PATH, "cache_dir": _PATH}
