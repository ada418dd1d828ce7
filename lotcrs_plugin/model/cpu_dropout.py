"""Dropout whose masks are cheap to draw on a CPU.

torch draws a CPU dropout mask one Mersenne-Twister number per element: in MiniLM's fine-tuning
step on a 2-core EPYC that was 30% of the step (``aten::bernoulli_``), more than the attention
matmuls. Here one 64-bit draw gives four 16-bit lanes, of which the low 15 bits are uniform
(``random_()`` leaves an int64's sign bit 0), and an element is kept when its lane's 15 bits are at
least ``p * 2**15``: the same Bernoulli(1 - p) mask and 1/(1 - p) scaling, p rounded to 1/32768,
from torch's seeded CPU generator (runs stay reproducible). The attention probabilities get the same
mask through an attention implementation registered with transformers ("lotcrs_cpu_dropout"):
while training on a CPU with dropout it computes the attention as the eager path does, with this
mask; otherwise it is transformers' SDPA path. On other devices both are the native dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "lotcrs_cpu_dropout"
CPU_DROPOUTS = ("fast", "native")  # the cpu_dropout key of lotcrs: and lotcrs_pretrain:
_LANE_BITS = 15


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of ``shape``, each element True with probability 1 - p (p to 1/32768)."""
    n = shape.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    lanes = draws.view(torch.int16)[:n].bitwise_and(2**_LANE_BITS - 1)
    return lanes.ge(round(p * 2**_LANE_BITS)).view(shape)


def cpu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a cheap mask on a CPU (the native op elsewhere)."""
    if not training or p <= 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p, training)
    return x * keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / (1.0 - p))  # one product in forward and backward


class CPUDropout(nn.Dropout):
    """nn.Dropout with :func:`cpu_dropout`; keeps ``p`` where a model reads it (attention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_dropout(x, self.p, self.training)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (dropout <= 0 or not module.training or query.device.type != "cpu"
             or getattr(module, "num_key_value_groups", 1) > 1 or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None or key.shape[2] != value.shape[2])
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None:  # SDPA's mask: bool (True = attend) or additive
        mask = attention_mask[:, :, :, :k_len]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    elif q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    probs = cpu_dropout(probs, dropout, True)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def _swap(module: nn.Module, old_attention: tuple[str, ...], new_attention: str, old_dropout: type,
          new_dropout: type) -> int:
    """Every Hugging Face model in ``module`` whose attention is one of ``old_attention`` attends
    through ``new_attention``; every dropout of exactly ``old_dropout`` becomes a ``new_dropout`` of
    the same p and mode. Returns the dropouts swapped."""
    from transformers import PreTrainedModel

    swapped = 0
    for parent in list(module.modules()):
        if isinstance(parent, PreTrainedModel) and parent.config._attn_implementation in old_attention:
            parent.set_attn_implementation(new_attention)
        for name, child in list(parent.named_children()):
            if type(child) is old_dropout:
                new = new_dropout(child.p, child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += 1
    return swapped


def use_cpu_dropout(module: nn.Module) -> int:
    """Every nn.Dropout in ``module`` becomes a :class:`CPUDropout` of the same p, and every
    Hugging Face model in it that attends through SDPA or eager attention attends through
    "lotcrs_cpu_dropout"; returns the dropouts swapped."""
    _register()
    return _swap(module, ("sdpa", "eager"), ATTENTION, nn.Dropout, CPUDropout)


def use_native_dropout(module: nn.Module) -> int:
    """Undo :func:`use_cpu_dropout`: torch's dropout and SDPA attention again; returns the
    dropouts swapped back."""
    return _swap(module, (ATTENTION,), "sdpa", CPUDropout, nn.Dropout)


__all__ = ["ATTENTION", "CPU_DROPOUTS", "CPUDropout", "cpu_dropout", "keep_mask", "use_cpu_dropout",
           "use_native_dropout"]
