"""RepeatPopularity: mentioned items first (most recent first), then by popularity; runs in
CRSLab's TG-ReDial system on the synthetic dataset and is scored by the long-tail evaluator."""

from __future__ import annotations

import math

import pytest
import torch

from lotcrs_plugin import registry
from lotcrs_plugin.model import repeat_ranker
from lotcrs_plugin.model.repeat_ranker import RepeatPopularityModel
from lotcrs_plugin.runner import run

ITEMS = list(range(5, 15))  # entities 5..14 are the catalog; 15..19 other entities
MENTIONS = {5: 3, 6: 9, 7: 1, 8: 9, 9: 0, 10: 4, 11: 2, 12: 7, 13: 5, 14: 0}


def _model(stats: bool = True) -> RepeatPopularityModel:
    side = {"item_entity_ids": ITEMS}
    if stats:
        side["item_stats"] = {i: {"name": f"m{i}", "train_mentions": c} for i, c in MENTIONS.items()}
    return RepeatPopularityModel({"dataset": "t"}, torch.device("cpu"), {"n_entity": 20, "pad": 0}, side)


def _batch(history: list[list[int]], target: list[int]) -> tuple:
    h = torch.tensor(history)
    return (None, None, h, None, (h != 0).long(), None, torch.tensor(target))


def _ranking(scores: torch.Tensor) -> list[int]:
    """Catalog items best first, as TGReDialSystem ranks them."""
    order = torch.argsort(scores[:, ITEMS], dim=-1, descending=True, stable=True)
    return [[ITEMS[j] for j in row] for row in order.tolist()]


def test_mentioned_first_most_recent_first_then_popularity():
    model = _model()
    # left-padded histories, oldest first; 17 is an entity that is not an item
    loss, scores = model.forward(_batch([[0, 0, 7, 9, 17, 7, 11], [0, 0, 0, 0, 0, 0, 0]], [5, 5]), "test")
    first, empty = _ranking(scores)
    assert first[:3] == [11, 7, 9]  # 7 was mentioned twice: its last mention counts
    by_popularity = [6, 8, 12, 13, 10, 5, 11, 7, 9, 14]  # ties (6, 8) and (9, 14) by catalog order
    assert first[3:] == [i for i in by_popularity if i not in (11, 7, 9)]
    assert empty == by_popularity
    assert scores.shape == (2, 20) and loss.requires_grad and loss.item() == 0.0
    assert model.forward(_batch([[0, 7]], [5]), "infer").shape == (1, 20)


def test_popularity_counted_from_training_batches_without_item_stats():
    model = _model(stats=False)
    model.forward(_batch([[0, 0]] * 4, [12, 12, 9, 12]), "train")
    model.forward(_batch([[0, 0]] * 2, [9, 14]), "train")
    model.forward(_batch([[0, 0]] * 2, [6, 6]), "test")  # evaluation does not count
    (ranking,) = _ranking(model.forward(_batch([[0, 0]], [5]), "test")[1])
    assert ranking[:4] == [12, 9, 14, 5]


def test_runs_in_crslab_with_the_longtail_evaluator():
    # the lead adds these to PLUGIN_PARTS; registering the same objects again is a no-op
    registry.register_model("RepeatPopularity", RepeatPopularityModel)
    registry.register_dataloader("RepeatPopularity", repeat_ranker.RepeatPopularityDataLoader)
    registry.register_system("RepeatPopularity", repeat_ranker.RepeatPopularitySystem)
    opt = {
        "dataset": "synthetic",
        "synthetic": {"n_items": 60, "n_conversations": 160, "seed": 3},
        "tokenize": {"rec": "nltk"},
        "rec_model": "RepeatPopularity",
        "context_truncate": 128,
        "item_truncate": 50,
        "evaluator": "longtail",
        "rec": {"epoch": 1, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.001}, "lr_bert": 0.001},
    }
    result = run(opt)
    rec = result.test["rec"]
    assert all(0.0 <= rec[f"hit@{k}"] <= 1.0 and not math.isnan(rec[f"hit@{k}"]) for k in (1, 10, 50))
    assert rec["hit@1"] <= rec["hit@10"] <= rec["hit@50"]
    longtail = result.test["longtail"]
    # one target per sample: CRSLab's hit@k and the long-tail evaluator's recall@k count the same lists
    for k in (1, 10, 50):
        assert rec[f"hit@{k}"] == pytest.approx(longtail["metrics"][f"recall@{k}"], abs=1e-9), k
    assert longtail["n_samples"] > 0 and longtail["tail"]["catalog_size"] == 60
    # the head of every list is the mentioned items, so lists differ across samples
    assert longtail["metrics"]["coverage@1"] > 1 / 60
