"""Dropout whose masks are cheap to draw on a CPU.

torch draws a CPU dropout mask one Mersenne-Twister number per element: in MiniLM's fine-tuning
step on a 2-core EPYC that was 30% of the step (``aten::bernoulli_``), more than the attention
matmuls. Here one 64-bit draw over the full 64-bit range gives eight uniform bytes, and an element
is kept when its byte is at least ``round(p * 256)``: a Bernoulli mask whose drop rate is p rounded
to 1/256 (0.1 becomes 26/256 = 0.1016), with the matching 1/(1 - rate) scaling, from torch's seeded
CPU generator (runs stay reproducible). The mask is built as 0/1 values of the tensor's dtype
through a uint8 view (bool tensors take a slow, unvectorised path in torch's elementwise kernels),
and the scaling is a separate product by a Python number, so it is exact in bf16 too.

The attention probabilities get such a mask through an attention implementation registered with
transformers ("lotcrs_cpu_dropout"): while training on a CPU with dropout it computes softmax,
dropout and their backward in one autograd function (:func:`attend`); otherwise it is transformers'
SDPA path. On other devices both are the native dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "lotcrs_cpu_dropout"
CPU_DROPOUTS = ("fast", "native")  # the cpu_dropout key of lotcrs: and lotcrs_pretrain:
_LEVELS = 256  # one byte per element


def _threshold(p: float) -> int:
    return round(p * _LEVELS)


def drop_rate(p: float) -> float:
    """The rate that the cheap mask drops for a requested ``p`` (p rounded to 1/256)."""
    return _threshold(p) / _LEVELS


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of ``shape``, each element True with probability ``1 - drop_rate(p)``."""
    n = shape.numel()
    draws = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-2**63, None)  # all 64 bits uniform
    return draws.view(torch.uint8)[:n].ge(_threshold(p)).view(shape)


def _kept(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`keep_mask` as 0/1 values of ``dtype`` (converted through uint8: see the module docstring)."""
    return keep_mask(shape, p).view(torch.uint8).to(dtype)


def cpu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a cheap mask on a CPU (the native op elsewhere)."""
    if not training or p <= 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p, training)
    rate = drop_rate(p)
    if rate == 0:
        return x
    if rate >= 1:
        return x * 0
    return (x * _kept(x.shape, p, x.dtype)).mul_(1.0 / (1.0 - rate))


class CPUDropout(nn.Dropout):
    """nn.Dropout with :func:`cpu_dropout`; keeps ``p`` where a model reads it (attention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_dropout(x, self.p, self.training)


class _SoftmaxDropout(torch.autograd.Function):
    """``softmax(scores) * kept`` over the last dimension. The forward pass takes the fp32 softmax
    kernel and rounds once; the backward pass runs in the scores' dtype, which for bf16 is 3x
    faster than the fp32 kernel and its two casts that autograd would otherwise record."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        accumulate = torch.float32 if scores.dtype in (torch.bfloat16, torch.float16) else scores.dtype
        probs = torch.softmax(scores, -1, dtype=accumulate).to(scores.dtype)
        ctx.save_for_backward(probs, kept)
        return probs * kept

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, kept = ctx.saved_tensors
        return torch._softmax_backward_data(grad * kept, probs, -1, probs.dtype), None


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor | None,
           dropout: float, scaling: float) -> torch.Tensor:
    """Attention with the cheap dropout, (B, heads, Tq, d) from (B, heads, T, d) inputs.
    ``additive_mask`` broadcasts to the (B, heads, Tq, Tk) scores (0 to attend, a very negative
    number not to). The dropout's scaling is applied to the output, the smallest tensor."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = _SoftmaxDropout.apply(scores, _kept(scores.shape, dropout, scores.dtype))
    return torch.matmul(probs, value).mul_(1.0 / (1.0 - drop_rate(dropout)))


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An SDPA mask (bool, True = attend; or already additive) as an additive mask of ``dtype``."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (dropout <= 0 or drop_rate(dropout) >= 1 or not module.training
             or query.device.type != "cpu"
             or getattr(module, "num_key_value_groups", 1) > 1 or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None or key.shape[2] != value.shape[2])
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None:
        mask = additive(attention_mask[:, :, :, :k_len], query.dtype)
    elif q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = additive(causal, query.dtype)
    out = attend(query, key, value, mask, dropout, scaling)
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


__all__ = ["ATTENTION", "CPU_DROPOUTS", "CPUDropout", "additive", "attend", "cpu_dropout", "drop_rate", "keep_mask",
           "use_cpu_dropout", "use_native_dropout"]
