"""A BERT-family encoder run over the real tokens only.

A padded batch computes every layer at every position, padding included: 45% of the positions in
INSPIRED's pre-training batches, 13% in its fine-tuning batches. The token-wise parts of a layer
(the query/key/value and output projections, the feed-forward block, layer norms and dropouts) are
most of its work, and they do not look across positions. Here they run on the (N, H) rows of the N
real tokens; only attention, which mixes positions, sees the padded (B, heads, T, d) layout, with
the padded keys masked. The result equals the padded encoder's at every real token (padding rows
are zero instead of undefined), and so do the gradients; tests/test_packed_bert.py checks both.

The layers' own modules run (their Linear, LayerNorm and dropout objects, the cheap CPU dropout
included), so a checkpoint loads and saves as before. Models that are not plain bidirectional
BERT-style encoders (relative positions, a decoder, chunked feed-forward, another layer layout) are
left to their own forward pass: :func:`can_pack` tells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.model.cpu_dropout import CPUDropout, additive, attend

_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
                "intermediate", "output")


def can_pack(base_model: nn.Module) -> bool:
    """Whether ``base_model`` (a BertModel-like encoder) has the layout :func:`packed_states` runs."""
    config = getattr(base_model, "config", None)
    layers = getattr(getattr(base_model, "encoder", None), "layer", None)
    if config is None or layers is None or getattr(base_model, "embeddings", None) is None:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(config, "chunk_size_feed_forward", 0):
        return False
    return all(_has(layer, part) for layer in layers for part in _LAYER_PARTS)


def _has(module: nn.Module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


def packed_states(base_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  first_layer: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(first layer's states if ``first_layer`` else None, last layer's states), each (B, T, H),
    zero at padded positions; the encoder runs its token-wise parts on the real tokens only."""
    batch, width = input_ids.shape
    real = attention_mask.reshape(-1).nonzero().squeeze(1)
    states = base_model.embeddings(input_ids=input_ids).reshape(batch * width, -1)
    key_mask = None
    if real.numel() < batch * width:  # (B, 1, 1, T): every query row ignores the padded keys
        states = states.index_select(0, real)
        key_mask = additive(attention_mask.bool()[:, None, None, :], _compute_dtype(states))
    else:
        real = None  # no padding: the rows are the positions
    first = None
    for depth, layer in enumerate(base_model.encoder.layer):
        states = _layer(layer, states, real, batch, width, key_mask)
        if first_layer and depth == 0:
            first = _unpack(states, real, batch, width)
    return first, _unpack(states, real, batch, width)


def _compute_dtype(states: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(states.device.type):
        return torch.get_autocast_dtype(states.device.type)
    return states.dtype


def _unpack(rows: torch.Tensor, real: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
    """(N, H) rows of the real tokens -> (B, T, H), zero at padded positions."""
    if real is None:
        return rows.view(batch, width, -1)
    return rows.new_zeros(batch * width, rows.shape[-1]).index_copy(0, real, rows).view(batch, width, -1)


def _layer(layer: nn.Module, states: torch.Tensor, real: torch.Tensor | None, batch: int, width: int,
           key_mask: torch.Tensor | None) -> torch.Tensor:
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
    bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
    qkv = _unpack(F.linear(states, weight, bias), real, batch, width)  # (B, T, 3 * heads * size)
    query, key, value = qkv.view(batch, width, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
    context = _attention(attention, query, key, value, key_mask)      # (B, heads, T, size)
    context = context.transpose(1, 2).reshape(batch * width, heads * size)
    if real is not None:
        context = context.index_select(0, real)
    hidden = layer.attention.output(context, states)
    return layer.output(layer.intermediate(hidden), hidden)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
    p = module.dropout.p if module.training else 0.0
    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    if p > 0 and query.device.type == "cpu" and isinstance(module.dropout, CPUDropout):
        return attend(query, key, value, key_mask, p, scaling)
    mask = None if key_mask is None else key_mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p, scale=scaling)


__all__ = ["can_pack", "packed_states"]
