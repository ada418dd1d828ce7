"""The cheap CPU dropout (lotcrs_plugin.model.cpu_dropout): the mask's rate, the scaling, the
softmax-dropout backward, the same model outputs as the native path when no element is dropped
(bidirectional and causal attention, padding, bf16), reproducibility from the seed, and the config key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.cpu_dropout import (ATTENTION, CPUDropout, additive, attend, cpu_dropout, drop_rate,
                                             keep_mask, use_cpu_dropout, use_native_dropout)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_mask_keeps_one_minus_the_rounded_p_of_the_elements(p):
    assert abs(drop_rate(p) - p) <= 1 / 512 and drop_rate(0.1) == 26 / 256
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([2000, 1000]), p)
    assert mask.dtype == torch.bool and mask.shape == (2000, 1000)
    assert abs(mask.float().mean().item() - (1 - drop_rate(p))) < 0.002  # 2M draws: 4 sigma is ~0.0013
    # the eight lanes of one draw are not one value: each lane alone keeps 1 - rate (the top byte too)
    lanes = mask.flatten()[: 8 * 200_000].view(-1, 8).float().mean(0)
    assert torch.allclose(lanes, torch.full((8,), 1 - drop_rate(p)), atol=0.006)
    pairs = mask.flatten()[: 8 * 200_000].view(-1, 8).float()
    both = (pairs[:, 0] * pairs[:, 7]).mean().item()  # independent lanes: P(both kept) = (1 - rate)^2
    assert abs(both - (1 - drop_rate(p)) ** 2) < 0.006


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_and_the_rest_are_zero(dtype):
    torch.manual_seed(0)
    x = (torch.rand(300, 300) + 1.0).to(dtype)
    y = cpu_dropout(x, 0.2, training=True)
    kept = y != 0
    scale = 1 / (1 - drop_rate(0.2))
    want = (x[kept].float() * scale).to(dtype)  # the scale is exact, not rounded to bf16 first
    assert torch.equal(y[kept], want)
    assert abs(kept.float().mean().item() - (1 - drop_rate(0.2))) < 0.01
    assert cpu_dropout(x, 0.2, training=False) is x and cpu_dropout(x, 0.0, training=True) is x


def test_attention_with_the_cheap_dropout_has_autograds_gradient():
    """attend's own softmax-dropout backward equals autograd through softmax and the same mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[0, ..., 3:] = False
    add = additive(mask, torch.float64)
    state = torch.get_rng_state()
    out = attend(q, k, v, add, 0.3, 0.5)
    torch.set_rng_state(state)
    kept = keep_mask(torch.Size([2, 3, 5, 5]), 0.3).double()
    scores = (q * 0.5) @ k.transpose(-1, -2) + add
    want = (scores.softmax(-1) * kept) @ v / (1 - drop_rate(0.3))
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for got, ref in zip(got_grads, want_grads):
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert out[0, :, :, :].abs().sum() > 0 and kept.mean() < 1  # something was dropped


def test_a_seed_gives_the_same_mask_and_eval_draws_none():
    torch.manual_seed(3)
    a = keep_mask(torch.Size([64, 64]), 0.1)
    torch.manual_seed(3)
    b = keep_mask(torch.Size([64, 64]), 0.1)
    assert torch.equal(a, b) and not torch.equal(a, keep_mask(torch.Size([64, 64]), 0.1))
    drop = CPUDropout(0.1).eval()
    state = torch.get_rng_state()
    x = torch.ones(8, 8)
    assert drop(x) is x and torch.equal(torch.get_rng_state(), state)


def _tiny_bert(attention_dropout: float):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, attention_probs_dropout_prob=attention_dropout,
                                hidden_dropout_prob=0.0))


def test_bert_with_the_cheap_dropout_equals_the_native_one_when_nothing_is_dropped():
    # p = 1e-9 rounds to a threshold of 0: every element kept, so both paths compute the same function
    native, fast = _tiny_bert(1e-9), _tiny_bert(1e-9)
    fast.load_state_dict(native.state_dict())
    n_dropouts = sum(type(m) is nn.Dropout for m in fast.modules())
    assert use_cpu_dropout(fast) == n_dropouts > 0
    assert fast.config._attn_implementation == ATTENTION
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    ids = torch.randint(0, 120, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0  # padding: the attention mask must reach the cheap path
    native.train(), fast.train()
    want = native(input_ids=ids, attention_mask=mask).last_hidden_state
    got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got_bf16.float() - want).abs().max() < 0.05
    got.sum().backward()
    assert fast.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_bart_causal_decoder_with_the_cheap_dropout_equals_the_native_one():
    from transformers import BartConfig, BartModel

    cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     dropout=0.0, attention_dropout=1e-9, activation_dropout=0.0)
    torch.manual_seed(0)
    native = BartModel(cfg)
    fast = BartModel(cfg)
    fast.load_state_dict(native.state_dict())
    use_cpu_dropout(fast)
    ids = torch.randint(3, 100, (2, 7))
    native.train(), fast.train()
    want = native(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    got = fast(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_the_cheap_dropout_drops_attention_in_training():
    model = _tiny_bert(0.5)
    use_cpu_dropout(model)
    ids = torch.randint(0, 120, (2, 6))
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).last_hidden_state
    torch.manual_seed(1)
    b = model(input_ids=ids).last_hidden_state
    c = model(input_ids=ids).last_hidden_state
    assert torch.equal(a, b) and not torch.allclose(a, c)
    model.eval()
    assert torch.equal(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("block", ["lotcrs", "lotcrs_pretrain"])
def test_cpu_dropout_key_takes_fast_or_native(block):
    from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
    from lotcrs_plugin.config_blocks.pretrain import PretrainConfig

    cls = FinetuneConfig if block == "lotcrs" else PretrainConfig
    assert cls().cpu_dropout == "fast" and cls.from_dict({"cpu_dropout": "native"}).cpu_dropout == "native"
    with pytest.raises(UserError, match="key 'cpu_dropout' must be fast or native, not 'slow'"):
        cls.from_dict({"cpu_dropout": "slow"})


@pytest.mark.parametrize("mode", ["fast", "native"])
def test_the_lotcrs_model_takes_the_cheap_dropout_unless_native(plugin, backbone_paths, mode):
    from support import build_system, tiny_opt

    system = build_system(tiny_opt("bert", backbone_paths["bert"], pretrain=False, cpu_dropout=mode))
    kinds = {type(m) for m in system.model.backbone.modules()}
    assert (CPUDropout in kinds) == (mode == "fast") and (nn.Dropout in kinds) == (mode == "native")


def test_native_dropout_undoes_the_swap():
    model = _tiny_bert(0.1)
    n = use_cpu_dropout(model)
    assert use_native_dropout(model) == n and model.config._attn_implementation == "sdpa"
    assert not any(type(m) is CPUDropout for m in model.modules())
