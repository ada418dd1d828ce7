"""Best-epoch selection: the model tested is the best validation epoch's, and the test split
never reaches the choice. Tiny real runs on the synthetic dataset (60 items)."""

from __future__ import annotations

import pytest
import torch

from lotcrs_plugin import runner
from lotcrs_plugin.config import validate
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.system.selection import BestEpochSelector, SelectionConfig

TINY = {"n_items": 60, "n_conversations": 160, "seed": 3}


def textcnn(epochs: int = 4, **changes) -> dict:
    opt = {
        "dataset": "synthetic", "synthetic": dict(TINY), "tokenize": {"rec": "nltk"}, "rec_model": "TextCNN",
        "context_truncate": 64, "item_truncate": 20, "embed": 32, "num_filters": 32,
        "filter_sizes": "(2, 3)", "dropout": 0.1, "evaluator": "longtail",
        "rec": {"epoch": epochs, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.003}, "lr_bert": 0.001},
    }
    opt.update(changes)
    return opt


def kbrd(epochs: int = 4, **changes) -> dict:
    opt = {
        "dataset": "synthetic", "synthetic": dict(TINY), "tokenize": "nltk", "model": "KBRD",
        "context_truncate": 64, "response_truncate": 12, "token_emb_dim": 16, "kg_emb_dim": 16,
        "num_bases": 2, "n_heads": 2, "n_layers": 1, "ffn_size": 16, "dropout": 0.1,
        "attention_dropout": 0.0, "relu_dropout": 0.1, "learn_positional_embeddings": False,
        "embeddings_scale": True, "reduction": False, "n_positions": 64, "user_proj_dim": 16,
        "evaluator": "longtail",
        "rec": {"epoch": epochs, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.01}},
        "conv": {"epoch": 0, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.001}},
    }
    opt.update(changes)
    return opt


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def probe(monkeypatch):
    """Runs through the real runner, observing the built system from inside the selector: the rec
    model's state after each validation report and at the first rec test step."""
    seen: dict = {"val": {}, "tested": None, "system": None}
    build = runner._build_system

    def build_and_watch(*args, **kwargs):
        system = build(*args, **kwargs)
        seen["system"] = system
        model = BestEpochSelector._rec_model(system)
        step, report = system.step, system.evaluator.report

        def step_(batch, stage, mode):
            if stage == "rec" and mode == "test" and seen["tested"] is None:
                seen["tested"] = _copy(model)
            return step(batch, stage, mode)

        def report_(epoch=-1, mode="test"):
            out = report(epoch=epoch, mode=mode)
            if mode in ("val", "valid") and system.evaluator.last_report is not None:
                seen["val"][epoch] = _copy(model)
            return out

        # installed before the runner attaches selection, so these run inside its wrappers
        system.step, system.evaluator.report = step_, report_
        return system

    monkeypatch.setattr(runner, "_build_system", build_and_watch)
    return seen


def test_config_block_defaults_and_errors():
    assert SelectionConfig.from_dict({}) == SelectionConfig(True, "hit@1+hit@50", "max")
    assert SelectionConfig.from_dict({"metric": "recall@10"}).terms() == [("hit", 10)]
    assert SelectionConfig.from_dict({"metric": "tail_coverage@50 + ndcg@10"}).terms() == [
        ("tail_coverage", 50), ("ndcg", 10)]
    for bad, key in [({"metrc": "hit@10"}, "unknown key 'metrc'"), ({"mode": "best"}, "'mode'"),
                     ({"metric": "hit@0"}, "'hit@0' is not a metric"), ({"metric": "bleu@1"}, "bleu@1"),
                     ({"enabled": "yes"}, "'enabled'"), ({"metric": 10}, "'metric'")]:
        with pytest.raises(UserError, match=key):
            SelectionConfig.from_dict(bad)
    with pytest.raises(UserError, match="block 'selection': unknown key 'k'"):
        validate(textcnn(selection={"k": 10}))


def test_tested_model_is_the_best_validation_epochs(probe):
    """Selection on the real validation recall@10: the test pass scores the state of the epoch
    whose validation report was best (the first of equals), not the last epoch's."""
    result = runner.run(textcnn(epochs=4, selection={"metric": "recall@10"}))
    val = [r for r in result.reports if r["mode"] == "val"]
    scores = [r["longtail"]["metrics"]["recall@10"] for r in val]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    sel = result.selection
    assert [h["score"] for h in sel["history"]] == pytest.approx(scores)
    assert sel["selected_epoch"] == val[best]["epoch"] and sel["validation_score"] == pytest.approx(scores[best])
    assert sel["restored"] and sel["last_epoch"] == 3
    assert _same(probe["tested"], probe["val"][sel["selected_epoch"]])
    if sel["selected_epoch"] != 3:
        assert not _same(probe["tested"], probe["val"][3])


def test_forced_scores_restore_an_earlier_epoch_of_a_shared_model(probe, monkeypatch):
    """KBRD (one model for rec and conv, mode 'valid'): validation scores forced to peak at epoch 1."""
    forced = iter([0.2, 0.9, 0.5, 0.9])
    monkeypatch.setattr(BestEpochSelector, "score", lambda self: next(forced))
    result = runner.run(kbrd(epochs=4))
    sel = result.selection
    assert [h["score"] for h in sel["history"]] == [0.2, 0.9, 0.5, 0.9]
    assert (sel["selected_epoch"], sel["validation_score"], sel["restored"]) == (1, 0.9, True)
    assert _same(probe["tested"], probe["val"][1])
    assert not _same(probe["tested"], probe["val"][3])  # training moved the model after epoch 1
    assert "rec" in result.test and result.results_file


def test_test_split_never_influences_selection(probe, monkeypatch):
    """Same seed, a different test split (the training samples): identical selection, other test metrics."""
    first = runner.run(textcnn(epochs=3))
    build = runner._build_system  # the probe's wrapper

    def swap_test_split(*args, **kwargs):
        system = build(*args, **kwargs)
        system.test_dataloader = system.train_dataloader
        return system

    monkeypatch.setattr(runner, "_build_system", swap_test_split)
    second = runner.run(textcnn(epochs=3))
    assert first.selection["history"] == second.selection["history"]
    assert first.selection["selected_epoch"] == second.selection["selected_epoch"]
    assert first.test["longtail"]["n_samples"] != second.test["longtail"]["n_samples"]


def test_reports_with_test_or_train_samples_are_never_scored():
    """Driven directly with CRSLab's RecEvaluator: only a report whose samples all came from
    validation steps of the rec stage is a candidate."""
    from lotcrs_plugin import compat

    compat.apply()
    from crslab.evaluator.rec import RecEvaluator

    class System:  # the three attributes the selector uses
        def __init__(self):
            self.rec_model = torch.nn.Linear(2, 2)
            self.evaluator = RecEvaluator()

        def step(self, batch, stage, mode):
            for ranks, label in batch:
                self.evaluator.rec_evaluate(ranks, label)

    system = System()
    selector = BestEpochSelector(system, SelectionConfig(metric="hit@1")).attach()
    hit, miss = ([0, 1], 0), ([1, 0], 0)
    states = {}

    def epoch(e, steps, mode="val"):
        with torch.no_grad():  # "training" before every validation
            system.rec_model.weight.add_(1.0)
        system.evaluator.reset_metrics()
        states[e] = _copy(system.rec_model)
        for batch, step_mode in steps:
            system.step(batch, stage="rec", mode=step_mode)
        system.evaluator.report(epoch=e, mode=mode)

    epoch(0, [([miss], "val")])  # hit@1 0
    epoch(1, [([hit, miss], "val")])  # hit@1 0.5: the best
    epoch(2, [([hit], "val"), ([hit], "train")])  # would be 1.0, but mixes in training samples
    epoch(3, [([hit], "val")], mode="train")  # not a validation report
    epoch(4, [([miss], "val"), ([hit, hit], "test")])  # would be 0.67, but mixes in test samples
    assert selector.history == [{"epoch": 0, "score": 0.0}, {"epoch": 1, "score": 0.5}]
    # the first rec test step (in epoch 4) loaded epoch 1's state before the test batch was scored
    assert selector.restored and selector.summary()["selected_epoch"] == 1
    assert _same(_copy(system.rec_model), states[1]) and not _same(states[1], states[4])


def test_longtail_metric_needs_the_longtail_evaluator():
    with pytest.raises(UserError, match="needs `evaluator: longtail`"):
        runner.run(textcnn(epochs=1, evaluator="rec", selection={"metric": "tail_coverage@10"}))
