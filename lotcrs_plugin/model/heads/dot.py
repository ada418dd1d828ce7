"""``head.type: dot``: a projection of the state against item embeddings, plus a per-item bias.

The item embeddings start as the item tokens' input embeddings (the mean embedding of the item's
name, then what DMP pre-training on the balanced simulated data made of them): every item, tail
items included, starts where its name and attributes put it, so the head can score an item it
never saw as a training target. ``tie: false`` (the default, what won on validation,
benchmarks/results/head_diagnosis.md) trains a copy of them at the head's rate; true uses the
backbone's item-token rows themselves (one vector per item for the context and the answer, at the
encoder's rate). The projection starts as the identity, the scale at 1 and the bias at zero: at
initialisation the score is the state's dot product with the item's embedding."""

from __future__ import annotations

import torch
from torch import nn

from lotcrs_plugin.model.heads.base import HeadConfig, ItemHead, LinearParts, register_head


@register_head("dot")
class DotHead(ItemHead):
    default_read = "mean"

    def __init__(self, backbone, cfg: HeadConfig):
        super().__init__(backbone, cfg)
        hidden = backbone.hidden_size
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden))
            self.proj.bias.zero_()
        self.bias = nn.Parameter(torch.zeros(backbone.n_items))
        self.scale = nn.Parameter(torch.ones(()))  # the embeddings' norms are not the logits' scale
        self.items = None if cfg.tie else nn.Parameter(self._token_rows().detach().clone())

    def _token_rows(self) -> torch.Tensor:
        bb = self.backbone
        return bb.item_input_embeddings()

    def item_embeddings(self) -> torch.Tensor:
        """(N, H) the items' vectors the state is matched against."""
        return self._token_rows() if self.items is None else self.items

    def linear_parts(self, state: torch.Tensor) -> LinearParts:
        return self.scale * self.proj(state), self.item_embeddings(), self.bias
