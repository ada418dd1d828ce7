"""``head.type: verbaliser``: the paper's head. The backbone's own prediction head (BERT's MLM
transform and decoder, BART's LM head, UniCRS's item vectors) scores the item tokens at the state
read (the prompt's [MASK] in the paper). Its parameters are the backbone's, so pre-training (DMP)
trains them; for an encoder saved without an MLM head (all-MiniLM-L6-v2) the transform is fresh."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lotcrs_plugin.model.heads.base import ItemHead, LinearParts, register_head


@register_head("verbaliser")
class VerbaliserHead(ItemHead):
    default_read = "mask"

    def linear_parts(self, state: torch.Tensor) -> LinearParts:
        parts = self.backbone.item_head(state)
        if parts is None:  # a head of another form: its dense scores, as features against an identity
            scores = self.backbone.item_logits(state)
            return scores, torch.eye(scores.shape[-1], device=scores.device, dtype=scores.dtype), None
        return parts

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        parts = self.backbone.item_head(state)
        return self.backbone.item_logits(state) if parts is None else F.linear(*parts)

    def parts_or_scores(self, state: torch.Tensor):
        parts = self.backbone.item_head(state)
        return (parts, None) if parts is not None else (None, self.backbone.item_logits(state))

    def own_parameters(self) -> list:
        return []
