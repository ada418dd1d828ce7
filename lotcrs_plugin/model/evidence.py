"""The evidence term: what the dialog already says, as learned score bonuses added to the head's.

Three channels, each optional (``evidence:`` block, :class:`EvidenceConfig`):

- ``items``: every item named in the context gets ``f . (w + U s)``, with f its features
  (lotcrs_plugin.data.context_evidence.ITEM_FEATURES: named by the seeker / by the recommender,
  how often, how recently) and s the context's state: a learned copy term with a context gate (a
  seeker who names a movie she saw is not asking for it again; one who asks "is X good?" may be);
- ``attributes``: every item gets, per KG relation r (starring, director, genre, ...),
  ``a_r * log(1 + sum of idf(e) over the attributes e of the item that the context names)``;
- ``item_attributes``: the same with the attributes of the items the context names (a seeker who
  liked a Kubrick film may like another): ``c_r * log(1 + ...)``.

With ``attribute_gate``, the two attribute channels' per-relation weights also depend on the
context's state (``a_r + V_r s``, ``c_r + W_r s``): a seeker who asks for something new by genre, and
one who names films to say what she has already seen, can weigh the matches differently.

Every weight starts at zero, so at initialisation the term is zero and the model scores as its
head does; fine-tuning on the training split learns how much each channel is worth. The attribute
channels give every item, tail items included, a score from its attributes: the model can rank an
item it never saw as a training target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lotcrs_plugin.config_block import typed_values
from lotcrs_plugin.data.context_evidence import ITEM_FEATURES, EvidenceBatch, ItemAttributes
from lotcrs_plugin.errors import UserError


@dataclass(frozen=True)
class EvidenceConfig:
    """The ``evidence:`` block. items / attributes / item_attributes: the channels (module
    docstring); gate: the item channel's weights depend on the context's state (U s), else only w;
    attribute_gate: the same for the two attribute channels. lr: the learning rate of the term's
    weights (a few dozen numbers and the gates: faster than the encoder)."""

    items: bool = True
    attributes: bool = True
    item_attributes: bool = True
    gate: bool = True
    attribute_gate: bool = False
    lr: float = 0.01

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EvidenceConfig":
        cfg = cls(**typed_values(cls, d))
        if cfg.lr <= 0:
            raise UserError(f"evidence.lr must be positive, not {cfg.lr!r}")
        return cfg

    @property
    def enabled(self) -> bool:
        return self.items or self.attributes or self.item_attributes


class EvidenceTerm(nn.Module):
    """(B, N) bonuses from an :class:`EvidenceBatch` and the (B, H) context state."""

    def __init__(self, cfg: EvidenceConfig, n_items: int, hidden: int, attributes: ItemAttributes | None):
        super().__init__()
        self.cfg, self.n_items = cfg, int(n_items)
        n_feat = len(ITEM_FEATURES)
        self.item_weight = nn.Parameter(torch.zeros(n_feat)) if cfg.items else None
        self.item_gate = _zero_linear(hidden, n_feat) if cfg.items and cfg.gate else None
        wants_kg = cfg.attributes or cfg.item_attributes
        if wants_kg and (attributes is None or not attributes.relations):
            raise UserError("evidence.attributes / item_attributes need item attributes in the dataset's entity KG "
                            "(none found); set both to false")
        self.relations = list(attributes.relations) if wants_kg else []
        n_rel = len(self.relations)
        self.attribute_weight = nn.Parameter(torch.zeros(n_rel)) if cfg.attributes else None
        self.item_attribute_weight = nn.Parameter(torch.zeros(n_rel)) if cfg.item_attributes else None
        gated = cfg.attribute_gate
        self.attribute_gate = _zero_linear(hidden, n_rel) if gated and cfg.attributes else None
        self.item_attribute_gate = _zero_linear(hidden, n_rel) if gated and cfg.item_attributes else None
        if wants_kg:
            idf = torch.from_numpy(attributes.idf())
            rows = torch.from_numpy(attributes.item_rows)
            cols = torch.from_numpy(attributes.entity_cols)
            rels = torch.from_numpy(attributes.relation_ids)
            # (R * N, n_entity): relation r's block of rows holds item n's attributes, idf-weighted
            self.register_buffer("kg_by_relation", torch.sparse_coo_tensor(
                torch.stack([rels * n_items + rows, cols]), idf[cols], (n_rel * n_items, attributes.n_entity),
                check_invariants=False).coalesce(), persistent=False)
            # (n_entity, N) item -> attribute membership for every relation (the items' attribute sets)
            self.register_buffer("items_to_entities", torch.sparse_coo_tensor(
                torch.stack([cols, rows]), torch.ones(len(rows)), (attributes.n_entity, n_items),
                check_invariants=False).coalesce(), persistent=False)
            self.n_entity = attributes.n_entity

    def forward(self, state: torch.Tensor, ev: EvidenceBatch) -> torch.Tensor:
        b = state.shape[0]
        out = torch.zeros(b, self.n_items, device=state.device, dtype=torch.float32)
        if self.item_weight is not None:
            weight = _gated(self.item_weight, self.item_gate, state)
            valid = ev.items >= 0
            bonus = (ev.item_features * weight.unsqueeze(1)).sum(-1) * valid
            out = out.scatter_add(1, ev.items.clamp_min(0), bonus)
        if self.attribute_weight is not None:
            stated = self._multi_hot(ev.entities, torch.log1p(ev.entity_counts), b, state.device)
            out = out + self._matches(stated, _gated(self.attribute_weight, self.attribute_gate, state))
        if self.item_attribute_weight is not None:
            named = torch.zeros(b, self.n_items, device=state.device)
            named.scatter_(1, ev.items.clamp_min(0), (ev.items >= 0).float())
            # (B, n_entity): how many of the context's items have each attribute
            via_items = (self.items_to_entities @ named.t()).t()
            out = out + self._matches(torch.log1p(via_items),
                                      _gated(self.item_attribute_weight, self.item_attribute_gate, state))
        return out

    def _multi_hot(self, entities: torch.Tensor, values: torch.Tensor, b: int, device: Any) -> torch.Tensor:
        x = torch.zeros(b, self.n_entity, device=device)
        inside = (entities > 0) & (entities < self.n_entity)
        return x.scatter_add(1, entities.clamp(0, self.n_entity - 1), values * inside)

    def _matches(self, context: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """sum_r weight[b, r] * log(1 + idf-weighted overlap of relation r's attributes with ``context``);
        ``weight`` (B, R)."""
        per_relation = (self.kg_by_relation @ context.t()).t()  # (B, R * N)
        per_relation = torch.log1p(per_relation.reshape(context.shape[0], len(self.relations), self.n_items))
        return torch.einsum("brn,br->bn", per_relation, weight)

    def weights(self) -> dict[str, Any]:
        """The learned weights by name (for logs and the run summary)."""
        out: dict[str, Any] = {}
        if self.item_weight is not None:
            out["items"] = dict(zip(ITEM_FEATURES, np.round(self.item_weight.detach().cpu().numpy(), 4).tolist()))
        for key, w in (("attributes", self.attribute_weight), ("item_attributes", self.item_attribute_weight)):
            if w is not None:
                out[key] = dict(zip(self.relations, np.round(w.detach().cpu().numpy(), 4).tolist()))
        return out


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    """A Linear layer that starts at zero (the term starts as if ungated)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _gated(weight: torch.Tensor, gate: nn.Linear | None, state: torch.Tensor) -> torch.Tensor:
    """(B, K) per-context weights (K relations or item features): ``weight`` plus the gate's reading
    of the state."""
    out = weight.unsqueeze(0).expand(state.shape[0], -1)
    return out if gate is None else out + gate(state.float())


__all__ = ["EvidenceConfig", "EvidenceTerm"]
