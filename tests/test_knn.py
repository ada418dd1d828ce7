"""The kNN vote of the balanced store (lotcrs_plugin.model.knn): vote aggregation, ranking with a
sparse bonus equal to the dense computation, the vote steering the ranking on a tiny model, and
the pipeline choosing the weight on validation and restoring it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator.ranking import rank_dense, rank_linear
from lotcrs_plugin.model.knn import aggregate_votes, knn_bonus
from lotcrs_plugin.config_blocks.rerank import RerankConfig
from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig

from support import build_system, tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_votes_of_repeated_items_are_summed_per_row():
    items = torch.tensor([[3, 1, 3, -1], [2, 2, 2, 2], [-1, -1, -1, -1]])
    w = torch.tensor([[0.5, 0.2, 0.3, 0.9], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
    ids, votes = aggregate_votes(items, w)
    assert ids.tolist() == [[1, 3, -1, -1], [2, -1, -1, -1], [-1, -1, -1, -1]]
    torch.testing.assert_close(votes, torch.tensor([[0.2, 0.8, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0.]]))
    bonus = knn_bonus(votes, n_items=10, weight=2.0)
    assert bonus[0, 1].item() == pytest.approx(2 * np.log1p(8.0)) and bonus[2].abs().sum() == 0


@pytest.mark.parametrize("max_elements", [7, 40, 1 << 20])
def test_ranking_with_a_bonus_equals_the_dense_ranking(max_elements):
    g = torch.Generator().manual_seed(0)
    b, n, h = 9, 23, 5
    query, weight, bias = torch.randn(b, h, generator=g), torch.randn(n, h, generator=g), torch.randn(n, generator=g)
    ids = torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(b)])
    ids[0, 2:] = -1
    bonus = torch.rand(b, 4, generator=g) * 3
    targets = ids[:, 0].clone()
    targets[1] = 0
    ranking = rank_linear(query, weight, bias, 10, targets=targets, max_elements=max_elements, bonus=(ids, bonus))
    dense = query @ weight.T + bias
    dense.scatter_add_(1, ids.clamp(min=0), torch.where(ids >= 0, bonus, torch.zeros_like(bonus)))
    order = torch.sort(dense, dim=1, descending=True, stable=True).indices
    assert torch.equal(ranking.top_ids, order[:, :10])
    expect_rank = (order == targets[:, None]).float().argmax(1)
    assert torch.equal(ranking.target_rank, expect_rank)
    torch.testing.assert_close(ranking.logsumexp, torch.logsumexp(dense, 1), rtol=1e-5, atol=1e-5)
    # the dense ranker takes the same bonus, and leaves its score matrix as it was
    plain = query @ weight.T + bias
    kept = plain.clone()
    from_dense = rank_dense(plain, 10, targets=targets, max_elements=max_elements, bonus=(ids, bonus))
    assert torch.equal(plain, kept)
    assert torch.equal(from_dense.top_ids, order[:, :10]) and torch.equal(from_dense.target_rank, expect_rank)


def test_config_keys_are_validated():
    cfg = RerankConfig.from_dict({"knn_weight": "auto", "knn_grid": [0, 1], "knn_k": 5})
    assert cfg.knn_on and cfg.knn_grid == (0.0, 1.0)
    assert not RerankConfig.from_dict({}).knn_on
    for bad in ({"knn_weight": -1}, {"knn_weight": "sometimes"}, {"knn_grid": []}, {"knn_k": 0},
                {"knn_pooling": "max"}, {"knn_temperature": 0}):
        with pytest.raises(UserError, match=next(iter(bad))):
            RerankConfig.from_dict(bad)
    # their old place, the retrieval: block, names the new one
    with pytest.raises(UserError, match=r"key 'knn_weight' belongs to the rerank: block now .*rerank\.knn_weight"):
        RetrievalConfig.from_dict({"knn_weight": 1.0})


def test_a_heavy_vote_puts_the_nearest_simulated_items_first(plugin, backbone_paths):
    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False)
    opt["rerank"] = dict(knn_weight=0.0, knn_k=5)
    system = build_system(opt)
    voter = system.build_knn()
    model = system.model
    model.eval()
    batch = next(iter(system.batches(system.data("test"), train=False, batch_size=8)))
    with torch.no_grad():
        plain = model.rank_items(batch.tokens, batch.targets, 10, 1 << 20, evidence=batch.evidence)
        ids, votes = voter.votes(batch.tokens)
        assert ((votes.sum(1) - 1).abs() < 1e-4).all() and (ids[:, 0] >= 0).all()
        voter.weight = 50.0
        steered = model.rank_items(batch.tokens, batch.targets, 10, 1 << 20, evidence=batch.evidence)
    # a heavy vote: every row's first item is one the neighbours voted for, which the plain
    # ranking did not put first everywhere
    first = steered.top_ids[:, 0]
    assert (ids == first[:, None]).any(1).all()
    assert not (ids == plain.top_ids[:, :1]).any(1).all()
    voter.weight = 0.0
    with torch.no_grad():
        off = model.rank_items(batch.tokens, batch.targets, 10, 1 << 20, evidence=batch.evidence)
    assert torch.equal(off.top_ids, plain.top_ids) and torch.equal(off.target_rank, plain.target_rank)
    # the keys are the frozen encoder's: fine-tuning the model does not move them
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.5)
        again, _ = voter.votes(batch.tokens)
    assert torch.equal(again, ids)


def test_pipeline_chooses_the_weight_on_validation_and_restores_it(plugin, backbone_paths, lotcrs_home):
    from lotcrs_plugin.runner import run

    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False, run_name="t_knn")
    opt["rerank"] = dict(knn_weight="auto", knn_grid=[0, 1, 4], knn_k=8)
    opt["model_file"] = "t_knn_system.pth"
    result = run(opt, save_system=True)
    summary = json.loads((lotcrs_home / "save" / "t_knn" / "finetune.json").read_text())
    knn = summary["knn"]
    assert set(map(float, knn["scores"])) == {0.0, 1.0, 4.0}
    best = max(knn["scores"].values())
    assert knn["weight"] in (0.0, 1.0, 4.0) and knn["scores"][str(knn["weight"])] == best
    # the test split never reached the choice: its report is the only test-mode one
    assert [r["mode"] for r in result.reports if r.get("longtail")].count("test") == 1
    again = run(opt, restore_system=True)
    assert again.test["longtail"]["metrics"] == result.test["longtail"]["metrics"]


def test_weight_choice_scores_equal_full_validation_passes(plugin, backbone_paths):
    """The choice scores each weight from one model pass (model.score_parts); a full validation
    pass with that weight gives the same score."""
    from lotcrs_plugin.system.selection import BestEpochSelector, SelectionConfig

    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False)
    opt["rerank"] = dict(knn_weight="auto", knn_grid=[0, 0.5, 3], knn_k=8, knn_metric="recall@10+ndcg@50")
    system = build_system(opt)
    voter = system.build_knn()
    system.choose_knn_weight()
    chosen = system.knn_selection["scores"]
    selection = SelectionConfig.from_dict({"metric": "recall@10+ndcg@50", "mode": "max"})
    for weight, score in chosen.items():
        voter.weight = weight
        system.evaluate("valid")
        assert BestEpochSelector(system, selection).score() == pytest.approx(score, abs=1e-9)
    assert len(set(round(v, 9) for v in chosen.values())) > 1  # the weights do rank differently
