"""The packed BERT encoder (lotcrs_plugin.model.backbones.packed_bert): the same states and gradients
as the padded encoder at every real token, in fp32 and under bf16; the layouts it refuses; the cheap
dropout inside it; the packed_tokens key reaching the backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lotcrs_plugin.model.backbones.packed_bert import can_pack, packed_states
from lotcrs_plugin.model.cpu_dropout import use_cpu_dropout


def _bert(**overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(BertConfig(**{**cfg, **overrides}), add_pooling_layer=False)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 120, (4, 11))
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 9:] = 0
    mask[3, 1:] = 0  # a one-token context
    return ids, mask


def test_packed_states_equal_the_padded_encoder_at_real_tokens_and_are_zero_at_padding():
    model = _bert().eval()
    ids, mask = _batch()
    real = mask.bool()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    first, last = packed_states(model, ids, mask, first_layer=True)
    assert last.shape == out.last_hidden_state.shape
    assert torch.allclose(last[real], out.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(first[real], out.hidden_states[1][real], atol=1e-5)
    assert torch.count_nonzero(last[~real]) == 0
    assert out.last_hidden_state[~real].abs().sum() > 0  # the padded encoder computes them all the same


def test_packed_gradients_equal_the_padded_encoders():
    model = _bert().train()
    ids, mask = _batch()
    weights = torch.randn(4, 11, 32) * mask[..., None]  # a loss over the real tokens only
    (model(input_ids=ids, attention_mask=mask).last_hidden_state * weights).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (packed_states(model, ids, mask)[1] * weights).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-5), name


def test_packed_states_under_bf16_autocast_are_the_padded_ones_within_rounding():
    model = _bert().eval()
    ids, mask = _batch()
    real = mask.bool()
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = packed_states(model, ids, mask)[1]
    assert (got[real].float() - want[real]).abs().max() < 0.05


def test_a_batch_without_padding_is_the_plain_encoder():
    model = _bert().eval()
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    assert torch.allclose(packed_states(model, ids, mask)[1], model(input_ids=ids).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"is_decoder": True}, {"position_embedding_type": "relative_key"},
                                       {"chunk_size_feed_forward": 4}])
def test_layouts_that_are_not_plain_bidirectional_encoders_are_not_packed(overrides):
    assert can_pack(_bert())
    model = _bert()
    for key, value in overrides.items():
        setattr(model.config, key, value)
    assert not can_pack(model)
    assert not can_pack(nn.Linear(2, 2))


def test_the_cheap_dropout_drops_inside_the_packed_encoder_from_the_seed():
    model = _bert(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2).train()
    use_cpu_dropout(model)
    ids, mask = _batch()
    torch.manual_seed(5)
    a = packed_states(model, ids, mask)[1]
    torch.manual_seed(5)
    b = packed_states(model, ids, mask)[1]
    c = packed_states(model, ids, mask)[1]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    model.eval()
    real = mask.bool()
    assert torch.allclose(packed_states(model, ids, mask)[1][real],
                          model(input_ids=ids, attention_mask=mask).last_hidden_state[real], atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_packed_tokens_key_reaches_the_backbone_and_both_paths_give_the_same_states(plugin, backbone_paths, packed):
    from support import build_system, tiny_opt

    from lotcrs_plugin.model.backbones.inputs import TokenBatch

    system = build_system(tiny_opt("bert", backbone_paths["bert"], pretrain=False, packed_tokens=packed))
    backbone = system.model.backbone
    assert backbone.pack_tokens is packed and can_pack(backbone.model.base_model)
    backbone.eval()
    ids, mask = _batch()
    ids = ids.clamp(max=backbone.model.config.vocab_size - 1)
    batch = TokenBatch(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        mine = backbone.encode(batch)
        backbone.pack_tokens = not packed
        other = backbone.encode(batch)
    real = mask.bool()
    assert torch.allclose(mine[real], other[real], atol=1e-4)


def test_packed_tokens_key_takes_a_boolean():
    from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
    from lotcrs_plugin.config_blocks.pretrain import PretrainConfig
    from lotcrs_plugin.errors import UserError

    for cls in (FinetuneConfig, PretrainConfig):
        assert cls().packed_tokens is True and cls.from_dict({"packed_tokens": False}).packed_tokens is False
        with pytest.raises(UserError, match="packed_tokens"):
            cls.from_dict({"packed_tokens": "yes"})
