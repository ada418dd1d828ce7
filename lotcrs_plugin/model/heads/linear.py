"""``head.type: linear``: a fresh linear layer over the items, on the mean of the context's states
by default: the classifier a researcher would write first (and the strongest learner of the heads
on a small real training split, benchmarks/results/head_diagnosis.md). It knows nothing of the
items beyond their training samples: an item never recommended in training only gets pushed down."""

from __future__ import annotations

import torch
from torch import nn

from lotcrs_plugin.model.heads.base import HeadConfig, ItemHead, LinearParts, register_head


@register_head("linear")
class LinearHead(ItemHead):
    default_read = "mean"

    def __init__(self, backbone, cfg: HeadConfig):
        super().__init__(backbone, cfg)
        self.out = nn.Linear(backbone.hidden_size, backbone.n_items)
        nn.init.normal_(self.out.weight, std=cfg.init_std)
        nn.init.zeros_(self.out.bias)

    def linear_parts(self, state: torch.Tensor) -> LinearParts:
        return state, self.out.weight, self.out.bias
