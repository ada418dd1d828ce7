"""The item heads and the evidence term inside the LOT-CRS pipeline (pre-training, store, fusion,
teacher, fine-tuning, test), and the determinism of a whole run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_lotcrs import (  # noqa: F401  (fixtures)
    PAPER_HEAD, _system, assert_longtail_in_range, backbone_paths, one_thread, plugin, tiny_opt,
)

NO_EVIDENCE = {"items": False, "attributes": False, "item_attributes": False}


@pytest.mark.parametrize("head", ["verbaliser", "linear", "dot"])
def test_every_head_runs_the_whole_pipeline(plugin, backbone_paths, lotcrs_home, head):
    """Pre-training, the memory store (values: the head's read), fusion, the teacher and the test
    work with each head; the store holds one value per simulated entry in the head's state space."""
    from lotcrs_plugin.runner import run

    opt = tiny_opt("bert", backbone_paths["bert"], {"head": {"type": head, "lr": 0.01}}, run_name=f"t_head_{head}")
    result = run(opt)
    assert_longtail_in_range(result.test["longtail"])
    summary = json.loads((lotcrs_home / "save" / f"t_head_{head}" / "finetune.json").read_text())
    assert summary["store_entries"] > 0 and summary["teacher"] == "simulated"
    assert summary["pretrained_from"].endswith("t_bert_pre/backbone")


@pytest.mark.parametrize("head", ["linear", "dot"])
def test_store_values_are_the_heads_read_and_fusion_feeds_the_head(plugin, backbone_paths, head):
    system = _system(tiny_opt("bert", backbone_paths["bert"], {"head": {"type": head}, "evidence": NO_EVIDENCE},
                              pretrain=False))
    model = system.model
    store = system.build_store()
    model.eval()
    sim = system.data("simulated")
    batch = sim.subset(system.store_rows[:4])[np.arange(4)]
    with torch.no_grad():
        hidden = model.backbone.encode(batch.tokens)
        m = batch.tokens.attention_mask.unsqueeze(-1).float()
        # the store was encoded under bf16 autocast where the CPU runs it fast: bf16's precision
        tol = 2e-2 if system.autocast else 1e-5
        np.testing.assert_allclose(store.values[:4], ((hidden * m).sum(1) / m.sum(1)).numpy(), rtol=tol, atol=tol)
        test = next(iter(system.batches(system.data("test"), train=False, batch_size=8)))
        out = model(test.tokens)
        fused = model.fusion(out.states[:, None], out.retrieved.values, value_mask=out.retrieved.mask)[:, 0]
        torch.testing.assert_close(out.logits, model.head(fused))


def test_evidence_term_is_learned_by_fine_tuning_and_absent_when_off(plugin, backbone_paths):
    """Zero at initialisation; fine-tuning on the training split moves its weights and its
    scores; with every channel off the model has no term and the batches carry no evidence."""
    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False, max_train_batches=4)
    opt["smoothing"] = {"teacher": "none"}
    system = _system(opt)
    term = system.model.evidence
    assert term is not None
    before = {k: v.detach().clone() for k, v in term.state_dict().items()}
    assert all(float(v.abs().sum()) == 0.0 for v in before.values())
    batch = next(iter(system.batches(system.data("valid"), train=False)))
    assert batch.evidence is not None and int((batch.evidence.items >= 0).sum()) > 0
    with torch.no_grad():
        states = system.model.read(system.model.backbone.encode(batch.tokens), batch.tokens)
        assert float(term(states, batch.evidence).abs().max()) == 0.0
    system.build_optim()
    system.train_epoch()
    moved = [k for k, v in term.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "no evidence weight changed in fine-tuning"
    with torch.no_grad():
        assert float(term(states, batch.evidence).abs().max()) > 0.0

    off = _system(tiny_opt("bert", backbone_paths["bert"], {"evidence": NO_EVIDENCE}, pretrain=False))
    assert off.model.evidence is None
    assert next(iter(off.batches(off.data("valid"), train=False))).evidence is None


def test_head_and_evidence_learn_at_their_own_rates(plugin, backbone_paths):
    system = _system(tiny_opt("bert", backbone_paths["bert"], {"head": {"type": "dot", "lr": 0.003},
                                                               "evidence": {"lr": 0.02}}, pretrain=False))
    system.build_optim()
    rate = {id(p): g["lr"] for g in system.optimizer.param_groups for p in g["params"]}
    model = system.model
    assert {rate[id(p)] for p in model.head.parameters()} == {0.003}
    assert {rate[id(p)] for p in model.evidence.parameters()} == {0.02}
    assert {rate[id(p)] for p in model.backbone.parameters() if p.requires_grad} == {system.cfg.lr}


def test_two_runs_of_one_config_and_seed_give_the_same_metrics(plugin, backbone_paths, lotcrs_home):
    """The whole pipeline (pre-training included, each run in its own folders) twice: the same
    validation history and test metrics, to the last digit."""
    from lotcrs_plugin.runner import run

    reports = []
    for n in range(2):
        opt = tiny_opt("bert", backbone_paths["bert"], run_name=f"t_twice_{n}", epochs=2)
        opt["lotcrs_pretrain"]["run_name"] = f"t_twice_pre_{n}"
        result = run(opt)
        summary = json.loads((lotcrs_home / "save" / f"t_twice_{n}" / "finetune.json").read_text())
        reports.append((result.test["longtail"], [h["score"] for h in summary["history"]]))
    assert reports[0] == reports[1]


def test_paper_head_config_is_the_verbaliser_without_evidence(plugin, backbone_paths):
    system = _system(tiny_opt("bert", backbone_paths["bert"], PAPER_HEAD, pretrain=False))
    assert system.model.head.name == "verbaliser" and system.model.evidence is None
