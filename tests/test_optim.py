"""The optimizer of pre-training and fine-tuning (lotcrs_plugin.system.optim): groups by rate and
decay, the fused kernel where the device has it, the schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lotcrs_plugin.system.optim import adamw_linear


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def test_fused_on_the_cpu_updates_as_the_loop_over_tensors():
    a, b = _model(), _model()
    fused, _ = adamw_linear(a, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, total_steps=10)
    loop, _ = adamw_linear(b, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, total_steps=10, fused=False)
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(5):
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    moved = False
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(p, _model().state_dict()[name])
    assert moved


def test_groups_split_rates_and_decay_and_the_schedule_warms_up_then_decays():
    model = _model()
    head = model[2].weight
    opt, sched = adamw_linear(model, lr=1e-3, weight_decay=0.1, warmup_ratio=0.2, total_steps=10,
                              rates={id(head): 1e-2})
    groups = {(g["initial_lr"], g["weight_decay"]): len(g["params"]) for g in opt.param_groups}
    # decayed matrices at 1e-3 (the first linear) and 1e-2 (the head); biases and the norm undecayed
    assert groups == {(1e-3, 0.1): 1, (1e-3, 0.0): 4, (1e-2, 0.1): 1}
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 2 warm-up steps rise to the peak, then a linear fall towards 0
    assert rates[0] < rates[1] < rates[2] == 1e-3 and all(x > y > 0 for x, y in zip(rates[2:], rates[3:]))


def test_adam_eps_is_a_checked_knob_of_both_training_blocks():
    from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
    from lotcrs_plugin.config_blocks.pretrain import PretrainConfig
    from lotcrs_plugin.errors import UserError

    for block in (FinetuneConfig, PretrainConfig):
        assert block.from_dict(None).adam_eps == 1e-8 and block.from_dict({"adam_eps": 1e-6}).adam_eps == 1e-6
        with pytest.raises(UserError, match="key 'adam_eps' must be positive, not 0.0"):
            block.from_dict({"adam_eps": 0})
    opt, _ = adamw_linear(_model(), lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, total_steps=1, eps=1e-6)
    assert {g["eps"] for g in opt.param_groups} == {1e-6}
