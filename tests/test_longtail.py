"""The long-tail evaluator: every metric against hand-computed values, the tail definitions,
the index spaces, and the evaluator built and used by real CRSLab systems through the hook."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lotcrs_plugin import paths
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator import install
from lotcrs_plugin.evaluator.catalog import Catalog, tail_mask
from lotcrs_plugin.evaluator.config import LongTailConfig
from lotcrs_plugin.evaluator.longtail import LongTailEvaluator
from lotcrs_plugin.evaluator.metrics import (MRR, NDCG, AveragePopularity, Coverage, Gini, RankData,
                                             Recall, TailCoverage, TailRecall)

# ---- the tiny example: 5 items, 4 samples, lists of 3 -----------------------------------------
# position:            0   1   2   3   4
ENTITY_IDS = [10, 11, 12, 13, 14]
TRAIN_MENTIONS = [0, 1, 5, 9, 2]  # tail (<= 4): positions 0, 1, 4
SOURCE_MENTIONS = [4, 7, 3, 20, 5]  # tail (<= 4): positions 0, 2
RANKS = [[0, 1, 2], [2, 3, 4], [2, 1, 0], [2, 3, 1]]
LABELS = [1, 4, 0, 3]  # found at 0-based ranks 1, 2, 2, 1; targets 1, 4, 0 are tail


def stats(train=TRAIN_MENTIONS, source=SOURCE_MENTIONS, ids=ENTITY_IDS) -> dict:
    return {str(e): {"name": f"item {e}", "train_mentions": t, "source_mentions": s}
            for e, t, s in zip(ids, train, source)}


def catalog(config: LongTailConfig = LongTailConfig()) -> Catalog:
    return Catalog.build(ENTITY_IDS, stats(), config, "test stats")


def data(cat: Catalog | None = None) -> RankData:
    ranks = np.array(RANKS)
    return RankData(ranks, np.array(LABELS), np.full(4, 3), cat or catalog())


@pytest.fixture(scope="module", autouse=True)
def installed():
    install()


# ---- metrics by hand ------------------------------------------------------------------------

def test_recall_ndcg_mrr_by_hand():
    d = data()
    assert [Recall(k).calculate(d) for k in (1, 2, 3)] == [0.0, 0.5, 1.0]
    g = 1 / math.log2(3)  # a target at rank 1
    assert NDCG(1).calculate(d) == 0.0
    assert NDCG(2).calculate(d) == pytest.approx(2 * g / 4)
    assert NDCG(3).calculate(d) == pytest.approx((2 * g + 2 * 0.5) / 4)
    assert MRR(2).calculate(d) == pytest.approx((0.5 + 0.5) / 4)
    assert MRR(3).calculate(d) == pytest.approx((0.5 + 0.5 + 1 / 3 + 1 / 3) / 4)


def test_tail_recall_counts_only_tail_targets():
    d = data()
    assert d.target_is_tail().tolist() == [True, True, True, False]
    assert TailRecall(1).calculate(d) == 0.0
    assert TailRecall(2).calculate(d) == pytest.approx(1 / 3)  # only sample 0 of the 3 tail ones
    assert TailRecall(3).calculate(d) == 1.0
    no_tail = data(Catalog.build(ENTITY_IDS, stats(train=[9] * 5), LongTailConfig(), "s"))
    assert math.isnan(TailRecall(3).calculate(no_tail))


def test_coverage_denominators():
    d = data()
    # top-1 items {0, 2}; top-2 {0, 1, 2, 3}; top-3 all five
    assert [Coverage(k).calculate(d) for k in (1, 2, 3)] == [0.4, 0.8, 1.0]
    # tail {0, 1, 4}: the denominator is the 3 tail items, not the 5 of the catalog
    assert TailCoverage(1).calculate(d) == pytest.approx(1 / 3)
    assert TailCoverage(2).calculate(d) == pytest.approx(2 / 3)
    assert TailCoverage(3).calculate(d) == 1.0


def test_average_popularity_by_hand():
    d = data()
    assert AveragePopularity(1).calculate(d) == pytest.approx((0 + 5 + 5 + 5) / 4)
    assert AveragePopularity(2).calculate(d) == pytest.approx((0 + 1 + 5 + 9 + 5 + 1 + 5 + 9) / 8)
    src = data(catalog(LongTailConfig(count="source_mentions")))
    assert AveragePopularity(1).calculate(src) == pytest.approx((4 + 3 + 3 + 3) / 4)


def test_gini_uniform_skewed_and_by_hand():
    cat = catalog()
    uniform = RankData(np.array([[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]), np.zeros(5, dtype=int),
                       np.full(5, 2), cat)
    assert Gini(2).calculate(uniform) == pytest.approx(0.0)
    one_item = RankData(np.array([[3], [3], [3]]), np.zeros(3, dtype=int), np.ones(3, dtype=int), cat)
    assert Gini(1).calculate(one_item) == pytest.approx(4 / 5)  # (n - 1) / n
    d = data()
    # top-1 counts sorted [0, 0, 0, 1, 3]: (2*1 + 4*3) / (5 * 4)
    assert Gini(1).calculate(d) == pytest.approx(0.7)
    # top-2 counts sorted [0, 1, 2, 2, 3]: (-2*1 + 0*2 + 2*2 + 4*3) / (5 * 8)
    assert Gini(2).calculate(d) == pytest.approx(0.35)


# ---- tail definitions -----------------------------------------------------------------------

def test_tail_by_mentions_threshold_and_source_counts():
    cat = catalog()
    assert cat.is_tail.tolist() == [True, True, False, False, True]
    assert cat.metadata()["definition"] == "train_mentions <= 4"
    assert (cat.n_items, cat.n_tail) == (5, 3)
    src = catalog(LongTailConfig(count="source_mentions", threshold=4))
    assert src.is_tail.tolist() == [True, False, True, False, False]
    assert src.metadata()["definition"] == "source_mentions <= 4"
    assert catalog(LongTailConfig(threshold=1)).n_tail == 2
    int_keys = {int(k): v for k, v in stats().items()}  # ProcessedDataset's side_data uses int keys
    assert Catalog.build(ENTITY_IDS, int_keys, LongTailConfig(), "s").counts.tolist() == TRAIN_MENTIONS


def test_tail_by_recommender_mentions_and_an_old_import_missing_them():
    rec = [0, 1, 2, 1, 3]  # the training samples' counts: tail (<= 1) positions 0, 1, 3
    with_rec = {k: {**v, "train_rec_mentions": r} for (k, v), r in zip(stats().items(), rec)}
    cat = Catalog.build(ENTITY_IDS, with_rec, LongTailConfig(count="train_rec_mentions", threshold=1), "s")
    assert cat.is_tail.tolist() == [True, True, False, True, False]
    assert cat.metadata()["definition"] == "train_rec_mentions <= 1"
    with pytest.raises(UserError, match="train_rec_mentions for item entity id 10 .*import-data"):
        Catalog.build(ENTITY_IDS, stats(), LongTailConfig(count="train_rec_mentions"), "s")


def test_tail_by_fraction_with_ties_in_catalog_order():
    cfg = LongTailConfig(tail="fraction", fraction=0.4)
    assert catalog(cfg).is_tail.tolist() == [True, True, False, False, False]  # counts 0 and 1
    ties = tail_mask(np.array([1, 1, 1, 5, 5]), cfg)
    assert ties.tolist() == [True, True, False, False, False]
    assert tail_mask(np.arange(100)[::-1], LongTailConfig(tail="fraction", fraction=0.29)).sum() == 29
    meta = catalog(cfg).metadata()
    assert (meta["tail_size"], meta["catalog_size"], meta["tail_max_count"]) == (2, 5, 1)
    assert "40% least popular" in meta["definition"]


def test_source_mentions_missing_is_a_user_error():
    bad = stats(source=[4, None, 3, 20, 5])
    with pytest.raises(UserError, match="source_mentions for item entity id 11"):
        Catalog.build(ENTITY_IDS, bad, LongTailConfig(count="source_mentions"), "s")
    with pytest.raises(UserError, match="no entry for item entity id 99"):
        Catalog.build(ENTITY_IDS + [99], stats(), LongTailConfig(), "s")


def test_config_block_validation():
    assert LongTailConfig.from_dict({"ks": [50, 1, 10, 10]}).ks == (1, 10, 50)
    for bad, key in [({"treshold": 4}, "unknown key 'treshold'"), ({"threshold": "4"}, "'threshold'"),
                     ({"fraction": 1.5}, "'fraction'"), ({"tail": "head"}, "'tail'"),
                     ({"ks": []}, "'ks'"), ({"index_space": "ids"}, "'index_space'"),
                     ({"count": "mentions"}, "'count'")]:
        with pytest.raises(UserError, match=key):
            LongTailConfig.from_dict(bad)


# ---- the evaluator --------------------------------------------------------------------------

def evaluator(space: str = "position", **cfg) -> LongTailEvaluator:
    config = LongTailConfig(ks=(1, 2, 3), **cfg)
    return LongTailEvaluator(Catalog.build(ENTITY_IDS, stats(), config, "test stats"), config,
                             index_space=space)


def test_report_has_metrics_metadata_and_subsets():
    ev = evaluator()
    for i, (r, y) in enumerate(zip(RANKS, LABELS)):
        ev.rec_evaluate(r, y, {"unmentioned": i % 2 == 0})
    ev.report(mode="test")
    rep = ev.last_report
    assert rep["tail"]["catalog_size"] == 5 and rep["tail"]["tail_size"] == 3
    assert rep["tail"]["definition"] == "train_mentions <= 4"
    assert (rep["n_samples"], rep["n_tail_samples"], rep["ks"]) == (4, 3, [1, 2, 3])
    m = rep["metrics"]
    assert (m["recall@2"], m["coverage@2"], m["gini@1"]) == (0.5, 0.8, pytest.approx(0.7))
    assert m["tail_coverage@2"] == pytest.approx(2 / 3)
    sub = rep["subsets"]["unmentioned"]  # samples 0 and 2
    assert (sub["n_samples"], sub["n_tail_samples"]) == (2, 2)
    assert sub["metrics"]["recall@2"] == 0.5 and sub["metrics"]["coverage@1"] == 0.4
    json.dumps(rep, allow_nan=False)  # results JSON: NaN is written as null
    # CRSLab's names stay in rec_metrics (systems read hit@1 for early stopping)
    assert ev.rec_metrics["hit@2"] == 0.5 and ev.rec_metrics["mrr@3"] == pytest.approx(5 / 12)
    ev.reset_metrics()
    ev.report(mode="train")
    assert ev.last_report is None


def test_matches_crslab_rec_evaluator_on_random_lists():
    from crslab.evaluator.rec import RecEvaluator

    rng = random.Random(0)
    n = 60
    ids = list(range(100, 100 + n))
    config = LongTailConfig()
    cat = Catalog.build(ids, stats(train=[rng.randrange(10) for _ in ids], source=[None] * n, ids=ids),
                        config, "s")
    ours, theirs = LongTailEvaluator(cat, config), RecEvaluator()
    for _ in range(200):
        ranks, label = rng.sample(range(n), 50), rng.randrange(n)
        ours.rec_evaluate(ranks, label)
        theirs.rec_evaluate(ranks, label)
    for key, value in theirs.rec_metrics.report().items():
        assert ours.rec_metrics[key] == pytest.approx(value.value()), key
    ours.report()
    assert ours.last_report["metrics"]["recall@10"] == pytest.approx(theirs.rec_metrics["hit@10"])


def test_entity_index_space_maps_to_catalog_positions():
    by_pos, by_entity = evaluator("position"), evaluator("entity")
    by_pos.rec_evaluate_batch(np.array(RANKS), np.array(LABELS))
    by_entity.rec_evaluate_batch(torch.tensor(RANKS) + 10, torch.tensor(LABELS) + 10)
    by_pos.report()
    by_entity.report()
    assert by_entity.last_report["metrics"] == by_pos.last_report["metrics"]
    # entity ids that are not items: left out of coverage and popularity; a non-item target misses
    ev = evaluator("entity")
    ev.rec_evaluate([3, 10, 99], 10)
    ev.rec_evaluate([12, 3, 11], 3)
    ev.report()
    m = ev.last_report["metrics"]
    assert (m["recall@2"], m["coverage@3"], m["avg_popularity@3"]) == (0.5, 0.6, pytest.approx((0 + 5 + 1) / 3))


def test_position_out_of_catalog_is_a_user_error():
    ev = evaluator("position")
    ev.rec_evaluate([10, 11, 12], 13)
    with pytest.raises(UserError, match="index_space: entity"):
        ev.report()


def test_sample_flags_block_feeds_per_sample_calls():
    ev = evaluator()
    with ev.sample_flags(unmentioned=torch.tensor([True, False, True, False])):
        for r, y in zip(RANKS, LABELS):
            ev.rec_evaluate(r, y)
    ev.report()
    assert ev.last_report["subsets"]["unmentioned"]["n_samples"] == 2
    with pytest.raises(ValueError, match="2 flags given but rec_evaluate was called 1 times"):
        with ev.sample_flags(unmentioned=[True, False]):
            ev.rec_evaluate(RANKS[0], LABELS[0])


def test_gen_and_optim_metrics_for_conversation_stages(lotcrs_home):
    from crslab.evaluator.metrics.base import AverageMetric
    from crslab.evaluator.metrics.gen import PPLMetric

    ev = evaluator()
    ev.tensorboard = True
    ev.gen_evaluate("i like the movie", ["i like that movie a lot"])
    ev.gen_metrics.add("ppl", PPLMetric(1.0))
    ev.optim_metrics.add("gen_loss", AverageMetric(1.0))
    assert ev.gen_metrics["dist@1"] == 4 and ev.gen_metrics["dist@4"] == 1
    assert 0 < ev.gen_metrics["f1"] < 1 and ev.gen_metrics["ppl"] == pytest.approx(math.e)
    ev.report(epoch=0, mode="valid")
    assert ev.last_report is None  # no item sample in a conversation stage
    assert any((paths.active_layout().runs).rglob("events.out.tfevents.*"))


# ---- through CRSLab's systems and the hook --------------------------------------------------

N_ENTITY = 70
ITEM_IDS = random.Random(1).sample(range(1, N_ENTITY), 60)  # 60 items, not in id order
ITEM_TRAIN = [i % 7 for i in range(60)]  # tail (<= 4): positions with i % 7 <= 4


def item_stats_60() -> dict:
    return stats(train=ITEM_TRAIN, source=[None] * 60, ids=ITEM_IDS)


def popularity_system(longtail: dict | None = None, with_stats: bool = True):
    from crslab.system import get_system

    from lotcrs_plugin.config import to_crslab_config

    opt = {"dataset": "ReDial", "tokenize": {"rec": "nltk"}, "rec_model": "Popularity",
           "evaluator": "longtail", "rec": {"epoch": 1, "batch_size": 4}}
    if longtail is not None:
        opt["longtail"] = longtail
    side = {"item_entity_ids": ITEM_IDS}
    if with_stats:
        side["item_stats"] = item_stats_60()
    vocab = {"n_entity": N_ENTITY, "id2entity": {i: str(i) for i in range(N_ENTITY)}}
    loaders = ({}, {}, {})
    return get_system(to_crslab_config(opt), *loaders, {"rec": vocab}, {"rec": side})


def test_crslab_system_builds_and_feeds_the_evaluator():
    system = popularity_system({"ks": [1, 10, 50]})
    ev = system.evaluator
    assert isinstance(ev, LongTailEvaluator) and ev.index_space == "position"
    assert (ev.catalog.n_items, ev.catalog.n_tail) == (60, sum(c <= 4 for c in ITEM_TRAIN))
    # Popularity ranks items by frequency: item at position p gets frequency 1000 - p
    system.rec_model.item_frequency = {e: 1000 - p for p, e in enumerate(ITEM_IDS)}
    labels = [ITEM_IDS[0], ITEM_IDS[5], ITEM_IDS[30], ITEM_IDS[59]]
    batch = [torch.zeros(4, 2, dtype=torch.long)] * 6 + [torch.tensor(labels)]
    with ev.sample_flags(unmentioned=[True, True, False, False]):
        system.step(batch, stage="rec", mode="test")
    ev.report(mode="test")
    rep = ev.last_report
    m = rep["metrics"]
    assert (m["recall@1"], m["recall@10"], m["recall@50"]) == (0.25, 0.5, 0.75)  # positions 0, 5, 30 found
    assert m["coverage@10"] == pytest.approx(10 / 60) and m["coverage@50"] == pytest.approx(50 / 60)
    tail_in_top10 = sum(c <= 4 for c in ITEM_TRAIN[:10])
    assert m["tail_coverage@10"] == pytest.approx(tail_in_top10 / ev.catalog.n_tail)
    assert m["gini@1"] == pytest.approx(59 / 60)  # every sample gets the same top item
    assert m["avg_popularity@10"] == pytest.approx(np.mean(ITEM_TRAIN[:10]))
    assert rep["subsets"]["unmentioned"]["metrics"]["recall@10"] == 1.0
    assert ev.optim_metrics["rec_loss"] == 0.0  # CRSLab's optim metrics keep working


def test_policy_ranks_stay_out_of_item_metrics():
    system = popularity_system()
    ev = system.evaluator
    topics = torch.zeros(2, 55)
    topics[0, 7] = topics[1, 54] = 1.0  # topic 7 first for sample 0, topic 54 first for sample 1
    system.policy_evaluate(topics, torch.tensor([7, 3]))
    assert ev.rec_metrics["hit@1"] == 0.5  # CRSLab's train_policy reads this
    ev.report(mode="valid")
    assert ev.last_report is None  # topic ids never became catalog items


def test_kbrd_and_kgsf_rec_evaluate_label_index_mapping():
    """The real rec_evaluate of KBRD and KGSF: scores over entities, top-50 over item_ids,
    label = item_ids.index(entity). Same result as entity ids given to the batch API."""
    from crslab.system.kbrd import KBRDSystem
    from crslab.system.kgsf import KGSFSystem

    config = LongTailConfig()
    cat = Catalog.build(ITEM_IDS, item_stats_60(), config, "s")
    scores = torch.randn(8, N_ENTITY, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor(ITEM_IDS[::8])
    top = torch.topk(scores[:, ITEM_IDS], 50, dim=-1).indices
    reference = LongTailEvaluator(cat, config, index_space="entity")
    reference.rec_evaluate_batch(torch.tensor(ITEM_IDS)[top], labels)
    reference.report()
    for system_cls in (KBRDSystem, KGSFSystem):
        ev = LongTailEvaluator(cat, config, index_space="position")
        fake_system = SimpleNamespace(item_ids=ITEM_IDS, evaluator=ev)
        system_cls.rec_evaluate(fake_system, scores, labels)
        ev.report()
        assert ev.last_report["metrics"] == reference.last_report["metrics"], system_cls.__name__


def test_item_stats_from_the_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTCRS_HOME", str(tmp_path))
    monkeypatch.setattr(paths, "_active", None)
    folder = tmp_path / "data" / "dataset" / "ReDial"
    folder.mkdir(parents=True)
    (folder / "item_stats.json").write_text(json.dumps(item_stats_60()), encoding="utf-8")
    ev = popularity_system({"tail": "fraction", "fraction": 0.5}, with_stats=False).evaluator
    assert ev.catalog.source == str(folder / "item_stats.json")
    assert ev.catalog.n_tail == 30
    (folder / "item_stats.json").unlink()
    with pytest.raises(UserError, match="no item popularity for dataset 'ReDial'"):
        popularity_system(with_stats=False)


def test_hook_is_idempotent_and_other_evaluators_unchanged():
    import crslab.system.base as base
    from crslab.evaluator.rec import RecEvaluator

    init = base.BaseSystem.__init__
    install()
    assert base.BaseSystem.__init__ is init
    assert isinstance(base.get_evaluator("rec", "ReDial"), RecEvaluator)
    with pytest.raises(UserError, match="built from a system"):
        base.get_evaluator("longtail", "ReDial")


def test_bad_config_block_names_the_block():
    with pytest.raises(UserError, match="config block 'longtail': unknown key 'tresh'; known keys: tail, "):
        popularity_system({"tresh": 3})
