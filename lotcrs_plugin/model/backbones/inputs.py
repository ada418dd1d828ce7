"""What a backbone reads: a padded batch of formatted inputs (:class:`TokenBatch`), how one context
becomes one input (:class:`InputFormat`, picklable for DataLoader workers), and the dataset's entity
graph (:class:`EntityKG`).

Shapes: B batch, T positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from lotcrs_plugin.errors import UserError


@dataclass
class TokenBatch:
    """A padded batch of formatted inputs (right padding).

    input_ids, attention_mask: (B, T) long. keyword_mask: (B, T) bool, the positions of keyword
    tokens (item tokens and the tokens of attribute names). entity_ids: (B, T) long, the dataset
    entity id of a keyword at the FIRST token of its span, 0 elsewhere. mask_positions: (B,) long,
    the position of the prompt's mask token (-1 when there is no prompt).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keyword_mask: torch.Tensor | None = None
    entity_ids: torch.Tensor | None = None
    mask_positions: torch.Tensor | None = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TokenBatch":
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TokenBatch(**{k: fn(v) if v is not None else None for k, v in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TokenBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TokenBatch":
        return self._map(lambda t: t.pin_memory())

    def replace(self, **changes: Any) -> "TokenBatch":
        return dataclasses.replace(self, **changes)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EntityKG:
    """The dataset's entity graph, as UniCRS's R-GCN reads it (both directions and self loops
    are already in ``side_data['entity_kg']['edge']`` of the processed datasets)."""

    n_entity: int
    n_relation: int
    edge_index: torch.Tensor  # (2, E) long: heads, tails
    edge_type: torch.Tensor   # (E,) long

    @classmethod
    def from_side_data(cls, side_data: Mapping[str, Any], n_entity: int) -> "EntityKG":
        """From CRSLab's ``side_data`` (``entity_kg.edge`` as (head, tail, relation) rows)."""
        kg = side_data.get("entity_kg") if side_data else None
        if not kg or "edge" not in kg:
            raise UserError("the dataset has no entity KG (side_data['entity_kg']); the unicrs backbone needs one")
        edges = torch.as_tensor(np.asarray(kg["edge"], dtype=np.int64).reshape(-1, 3))
        n_relation = int(kg.get("n_relation", int(edges[:, 2].max()) + 1 if len(edges) else 1))
        return cls(int(n_entity), n_relation, edges[:, :2].t().contiguous(), edges[:, 2].contiguous())


@dataclass(frozen=True)
class InputFormat:
    """How a backbone turns a context into one input (see :meth:`build`)."""

    bos_ids: tuple[int, ...]
    sep_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    prompt_mask_index: int
    pad_id: int
    mask_id: int
    max_length: int

    def build(self, ids: np.ndarray, keyword: np.ndarray | None = None, entity: np.ndarray | None = None,
              *, prompt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``bos + context[-budget:] (+ prompt + sep)``, at most ``max_length`` ids.

        ``ids``: the context's token ids, every turn followed by ``sep_ids``; ``keyword`` /
        ``entity``: per-token arrays aligned with it. The context is cut from the LEFT (the most
        recent turns stay). Returns (ids, keyword, entity, position of the prompt's mask or -1).
        """
        tail = (self.prompt_ids + self.sep_ids) if prompt else ()
        n_bos, n_tail = len(self.bos_ids), len(tail)
        budget = self.max_length - n_bos - n_tail
        if budget < 1:
            raise UserError(f"max_length {self.max_length} leaves no room for the context (the prompt and "
                            f"special tokens take {n_bos + n_tail})")
        start = max(0, len(ids) - budget)
        n_ctx = len(ids) - start
        out = np.empty(n_bos + n_ctx + n_tail, dtype=np.int64)
        out[:n_bos] = self.bos_ids
        out[n_bos:n_bos + n_ctx] = ids[start:]
        out[n_bos + n_ctx:] = tail
        kw = np.zeros(len(out), dtype=bool)
        ent = np.zeros(len(out), dtype=np.int64)
        if keyword is not None:
            kw[n_bos:n_bos + n_ctx] = keyword[start:]
        if entity is not None:
            ent[n_bos:n_bos + n_ctx] = entity[start:]
        mask_pos = n_bos + n_ctx + self.prompt_mask_index if prompt else -1
        return out, kw, ent, mask_pos
