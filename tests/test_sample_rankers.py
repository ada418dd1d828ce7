"""Training-free rankers on the LOT-CRS samples (lotcrs.ranker: popularity | repeat_popularity)."""

from __future__ import annotations

import pytest
import torch

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.sample_rankers import SampleRanker, repeated_items, train_popularity

from support import tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_repeated_items_keep_the_last_mention():
    first = 100
    ids = torch.tensor([[5, 103, 7, 101, 103, 0], [101, 101, 9, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    items, last = repeated_items(ids, mask, first, n_items=4)
    found = [sorted((int(i), int(p)) for i, p in zip(r, q) if i >= 0) for r, q in zip(items, last)]
    assert found == [[(1, 3), (3, 4)], [(1, 1)]]


def test_repeat_ranker_puts_the_latest_mention_first_then_popularity():
    pop = torch.tensor([5.0, 1.0, 9.0, 0.0])
    ranker = SampleRanker("repeat_popularity", pop, first_item_id=100)

    class Batch:
        input_ids = torch.tensor([[101, 5, 103, 7], [8, 8, 8, 8]])
        attention_mask = torch.ones(2, 4, dtype=torch.long)

    ranking = ranker.rank(Batch, torch.tensor([1, 1]), 4, 1 << 20)
    assert ranking.top_ids.tolist() == [[3, 1, 2, 0], [2, 0, 1, 3]]
    assert ranking.target_rank.tolist() == [1, 2]
    plain = SampleRanker("popularity", pop, first_item_id=100).rank(Batch, None, 4, 3)
    assert plain.top_ids.tolist() == [[2, 0, 1, 3]] * 2


def test_missing_counts_and_unknown_rankers_are_refused():
    with pytest.raises(UserError, match="train_mentions"):
        train_popularity([1, 2], {"1": {"name": "x"}})
    with pytest.raises(UserError, match="repeat_popularity"):
        SampleRanker("random", torch.ones(3), 0)


def test_rankers_run_through_crslab_run(plugin, backbone_paths, lotcrs_home):
    """Through crslab's run on the synthetic data (its targets are never named before, so every
    sample is 'unmentioned'): popularity recommends one list to everyone; repeat_popularity
    first recommends the items each context names, so its top-1 lists vary."""
    from lotcrs_plugin.runner import run

    results = {}
    for ranker in ("repeat_popularity", "popularity"):
        opt = tiny_opt("bert", backbone_paths["bert"], ranker=ranker, run_name=f"t_{ranker}", max_length=512)
        results[ranker] = run(opt).test["longtail"]
    rep, pop = results["repeat_popularity"], results["popularity"]
    assert rep["subsets"]["unmentioned"]["n_samples"] == rep["n_samples"] == pop["n_samples"] > 0
    assert pop["metrics"]["coverage@1"] == pytest.approx(1 / pop["tail"]["catalog_size"])
    assert rep["metrics"]["coverage@1"] > 3 / rep["tail"]["catalog_size"]
