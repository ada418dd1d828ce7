"""Chunked full ranking (lotcrs_plugin.evaluator.ranking): the same top-K lists, target ranks and
cross-entropy as the dense computation, with ties in stable order, never a score block above
the bound; the backbones' linear item head; the lotcrs.eval_chunk_elements key."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator.ranking import block_shape, rank_chunked, rank_dense, rank_linear

from test_lotcrs import backbone_paths, plugin  # noqa: F401  (fixtures of the system test)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_reference(scores: torch.Tensor, targets: torch.Tensor, k: int):
    """Top-k and 0-based target ranks of a stable descending sort (ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = (order == targets[:, None]).float().argmax(1)
    return order[:, :k], ranks


@pytest.mark.parametrize("max_elements", [1 << 24, 37 * 100, 1000, 20])
def test_linear_ranking_equals_dense_topk_and_ranks(max_elements):
    g = torch.Generator().manual_seed(0)
    b, n, h, k = 37, 1013, 16, 50
    query, weight, bias = torch.randn(b, h, generator=g), torch.randn(n, h, generator=g), torch.randn(n, generator=g)
    targets = torch.randint(0, n, (b,), generator=g)
    targets[:5] = torch.topk(F.linear(query[:5], weight, bias), 3).indices[:, 2]  # some targets inside the top
    shapes: list[tuple[int, int]] = []
    r = rank_linear(query, weight, bias, k, targets=targets, max_elements=max_elements, on_block=shapes.append)
    dense = F.linear(query, weight, bias)
    top, ranks = dense_reference(dense, targets, k)
    assert torch.equal(r.top_ids, dense.topk(k).indices)  # random scores: no ties, topk's order
    assert torch.equal(r.top_ids, top)
    assert torch.equal(r.target_rank, ranks)
    assert (r.target_rank[:5] == 2).all()
    torch.testing.assert_close(r.top_scores, dense.gather(1, top))
    torch.testing.assert_close(r.logsumexp, torch.logsumexp(dense, 1))
    torch.testing.assert_close(r.cross_entropy("sum"), F.cross_entropy(dense, targets, reduction="sum"))
    assert max(rows * cols for rows, cols in shapes) <= max_elements
    # every (row, item) pair scored exactly once
    assert sum(rows * cols for rows, cols in shapes) == b * n


def test_ties_follow_a_stable_sort_across_chunks():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (23, 301), generator=g).float()  # many ties everywhere
    targets = torch.randint(0, 301, (23,), generator=g)
    for max_elements in (23 * 7, 23 * 64, 1 << 20, 5):
        r = rank_dense(scores, 40, targets=targets, max_elements=max_elements)
        top, ranks = dense_reference(scores, targets, 40)
        assert torch.equal(r.top_ids, top), max_elements
        assert torch.equal(r.target_rank, ranks), max_elements
    assert torch.equal(scores, torch.randint(0, 6, (23, 301), generator=torch.Generator().manual_seed(1)).float())


def test_block_shape_bounds_rows_and_items():
    assert block_shape(64, 100_000, 1 << 24) == (64, 100_000)
    assert block_shape(64, 100_000, 1 << 16) == (64, 1024)
    assert block_shape(64, 100_000, 10) == (10, 1)
    with pytest.raises(ValueError):
        block_shape(4, 4, 0)


def test_no_target_gives_rank_minus_one_and_k_is_capped():
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    r = rank_dense(scores, 50, targets=torch.tensor([-1, 0, 6]), max_elements=6)
    assert r.top_ids.shape == (3, 7)
    assert r.target_rank[0] == -1 and r.target_rank[1] >= 0
    torch.testing.assert_close(r.cross_entropy("sum"),
                               F.cross_entropy(scores[1:], torch.tensor([0, 6]), reduction="sum"))
    r2 = rank_chunked(lambda r0, r1, lo, hi: scores[r0:r1, lo:hi], 3, 7, 2, max_elements=4)
    assert r2.target_rank is None and torch.equal(r2.top_ids, scores.topk(2).indices)


def test_backbone_item_head_is_the_verbaliser(tmp_path):
    from lotcrs_plugin.model.backbones import build_backbone

    from test_backbones import NAMES, tiny_bert

    bb = build_backbone("bert", str(tiny_bert(tmp_path / "bert", with_head=True)))
    bb.add_item_tokens(NAMES)
    hidden = torch.randn(4, bb.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats, weight, bias = bb.item_head(hidden)
        assert weight.shape == (len(NAMES), feats.shape[1])
        torch.testing.assert_close(F.linear(feats, weight, bias), bb.item_logits(hidden))
        r = rank_linear(feats, weight, bias, 2, targets=torch.tensor([0, 1, 2, 0]), max_elements=4)
        top, ranks = dense_reference(bb.item_logits(hidden), torch.tensor([0, 1, 2, 0]), 2)
    assert torch.equal(r.top_ids, top) and torch.equal(r.target_rank, ranks)


def test_eval_chunk_elements_key():
    from lotcrs_plugin.system.lotcrs import FinetuneConfig

    assert FinetuneConfig.from_dict({}).eval_chunk_elements == 1 << 24
    assert FinetuneConfig.from_dict({"eval_chunk_elements": 4096}).eval_chunk_elements == 4096
    with pytest.raises(UserError, match="eval_chunk_elements"):
        FinetuneConfig.from_dict({"eval_chunk_elements": 0})
    with pytest.raises(UserError, match="eval_chunk_elements"):
        FinetuneConfig.from_dict({"eval_chunk_elements": "big"})


@pytest.mark.parametrize("paper", [True, False], ids=["verbaliser", "defaults"])
def test_system_evaluation_ranks_in_chunks_as_the_dense_scores(plugin, backbone_paths, paper):
    """LOTCRSModel.rank_items (retrieval on) gives forward()'s top lists and cross-entropy, and
    the system's evaluation with a small eval_chunk_elements reports the same as with one chunk:
    for the paper's verbaliser and for the default head with the evidence term."""
    import numpy as np

    from test_lotcrs import PAPER_HEAD, _system, tiny_opt

    system = _system(tiny_opt("bert", backbone_paths["bert"], PAPER_HEAD if paper else None, pretrain=False,
                              eval_chunk_elements=64 * 7))
    model = system.model
    system.build_store()
    model.eval()
    batch = next(iter(system.batches(system.data("test"), train=False)))
    with torch.no_grad():
        logits = model(batch.tokens, evidence=batch.evidence).logits.float()
        r = model.rank_items(batch.tokens, batch.targets, 50, 64 * 7, evidence=batch.evidence)
    top, ranks = dense_reference(logits, batch.targets, 50)
    assert torch.equal(r.top_ids, top) and torch.equal(r.target_rank, ranks)
    torch.testing.assert_close(r.cross_entropy(), F.cross_entropy(logits, batch.targets, reduction="sum"))

    def test_metrics() -> dict:
        system.evaluate("test")
        return {k: v.value() for k, v in system.evaluator.rec_metrics.report().items()}

    chunked = test_metrics()
    system.cfg = dataclasses.replace(system.cfg, eval_chunk_elements=1 << 24)
    assert chunked == test_metrics()
    assert np.isfinite(system.evaluator.optim_metrics.report()["rec_loss"].value())
