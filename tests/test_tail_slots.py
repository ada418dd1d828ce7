"""Tail slots (lotcrs_plugin.model.tail_slots): the reserved places, the merge of the model's list
with the vote's tail ranking, config validation, the slots on a tiny model, the pipeline choosing
them on validation under its keep metric and restoring them, and the vote's own pre-training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.config_blocks.rerank import RerankConfig
from lotcrs_plugin.model.tail_slots import grid_settings, merge_tail_slots, slot_mask

from support import build_system, tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slot_mask_reserves_the_last_places_before_each_cut_off():
    mask = slot_mask({10: 2, 50: 20}, 50)
    assert mask.nonzero().squeeze(1).tolist() == [8, 9] + list(range(30, 50))
    assert not slot_mask({10: 0, 50: 0}, 50).any()
    assert slot_mask({3: 1}, 5).tolist() == [False, False, True, False, False]


def test_merge_keeps_the_model_items_and_skips_tail_items_it_already_lists():
    model_top = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    # 12 is tail and already among the model's kept items: skipped; 12 appears twice in the candidates
    tail_top = torch.tensor([[12, 20, 12, 21, 22, 23]])
    mask = slot_mask({3: 1, 6: 2}, 6)  # places 2, 4, 5 are the tail's
    merged = merge_tail_slots(model_top, tail_top, mask)
    assert merged.tolist() == [[10, 11, 20, 12, 21, 22]]
    # too few tail candidates: the model's next items fill the rest, never an item twice
    merged = merge_tail_slots(model_top, torch.tensor([[10, 30, -1, 11, 10, 11]]), mask)
    assert merged.tolist() == [[10, 11, 30, 12, 13, 14]]
    assert len(set(merged[0].tolist())) == 6


def test_grid_settings_fewest_slots_first():
    settings = grid_settings({10: (0, 2), 50: (0, 10)})
    assert settings == [{10: 0, 50: 0}, {10: 2, 50: 0}, {10: 0, 50: 10}, {10: 2, 50: 10}]


def test_config_keys_are_validated():
    cfg = RerankConfig.from_dict({"tail_slots": {"10": 2, 50: 20}, "tail_slots_grid": {10: [1, 0, 1]}})
    assert cfg.tail_slots == {10: 2, 50: 20} and cfg.tail_slots_grid == {10: (0, 1)} and cfg.knn_on
    assert RerankConfig.from_dict({"tail_slots": "auto"}).knn_on
    assert not RerankConfig.from_dict({}).knn_on
    for bad, match in (({"tail_slots": {0: 1}}, "cut-off 0"), ({"tail_slots": {51: 1}}, "cut-off 51"),
                       ({"tail_slots": {10: 11}}, "11 slots do not fit"),
                       ({"tail_slots": {10: 2, 50: 41}}, "between cut-offs 10 and 50"),
                       ({"tail_slots": {10: -1}}, "slot count"), ({"tail_slots": "sometimes"}, "tail_slots"),
                       ({"tail_slots_grid": {10: []}}, "tail_slots_grid"),
                       ({"tail_logit_weight": -1}, "tail_logit_weight"),
                       ({"knn_pretrain": {"dmp_weight": 0}}, "own run_name")):
        with pytest.raises(UserError, match=match):
            RerankConfig.from_dict(bad)


def test_slots_put_the_votes_tail_items_at_the_reserved_places(plugin, backbone_paths):
    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False)
    opt["rerank"] = dict(knn_weight=0.0, knn_k=8, tail_slots={10: 3})
    system = build_system(opt)
    voter = system.build_knn()
    model = system.model
    model.eval()
    tail = model.tail_items
    assert tail is not None and tail.shape == (len(model.items),) and 0 < int(tail.sum()) < len(tail)
    batch = next(iter(system.batches(system.data("test"), train=False, batch_size=8)))
    with torch.no_grad():
        voter.tail_slots = None
        plain = model.rank_items(batch.tokens, batch.targets, 50, 1 << 20, evidence=batch.evidence)
        voter.tail_slots = {10: 3}
        slotted = model.rank_items(batch.tokens, batch.targets, 50, 1 << 20, evidence=batch.evidence)
        _, tail_top = model.rank_parts(batch.tokens, batch.targets, 50, 1 << 20, tail=True, evidence=batch.evidence)
    top = slotted.top_ids
    # the model's 7 best stay first, then 3 tail items the vote ranks best that the model's list (its
    # 47 items kept in the 50) does not hold
    assert torch.equal(top[:, :7], plain.top_ids[:, :7])
    assert tail[top[:, 7:10]].all()
    for row in range(top.shape[0]):
        fresh = [i for i in tail_top[row].tolist() if i not in plain.top_ids[row, :47].tolist()][:3]
        assert top[row, 7:10].tolist() == fresh
        assert len(set(top[row].tolist())) == 50
    # the model's 8th-10th items move down (the lists past the top 10 are the model's again)
    assert torch.equal(top[:, 10:], plain.top_ids[:, 7:47])
    # the target's rank is its place in the new list
    t = batch.targets
    inside = (top == t[:, None]).any(1)
    assert torch.equal(slotted.target_rank[inside], (top == t[:, None]).float().argmax(1)[inside])
    assert torch.equal(slotted.logsumexp, plain.logsumexp)


def test_pipeline_chooses_slots_on_validation_keeping_recall(plugin, backbone_paths, lotcrs_home):
    from lotcrs_plugin.runner import run

    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False, run_name="t_slots")
    opt["rerank"] = dict(knn_weight=0.0, knn_k=8, tail_slots="auto", tail_slots_grid={10: [0, 2, 5], 50: [0, 20]},
                         tail_slots_metric="tail_coverage@50", tail_slots_keep={"recall@10": 0.0, "recall@50": 0.2})
    opt["model_file"] = "t_slots_system.pth"
    result = run(opt, save_system=True)
    summary = json.loads((lotcrs_home / "save" / "t_slots" / "finetune.json").read_text())
    chosen = summary["tail_slots"]
    assert len(chosen["scores"]) == 6 and chosen["keep"] == {"recall@10": 0.0, "recall@50": 0.2}
    floor = chosen["keep_without_slots"]

    def within(s: dict) -> bool:  # recall@10 not lowered, recall@50 by at most 20% of its value
        return s["keep"]["recall@10"] >= floor["recall@10"] - 1e-9 and s["keep"]["recall@50"] >= 0.8 * floor["recall@50"] - 1e-9

    allowed = [s for s in chosen["scores"].values() if s["allowed"]]
    assert all(within(s) for s in allowed) and not any(within(s) for s in chosen["scores"].values() if not s["allowed"])
    assert chosen["scores"]["none"]["allowed"]
    best = max(allowed, key=lambda s: s["score"])
    assert chosen["slots"] == ({str(c): n for c, n in best["slots"].items()} if any(best["slots"].values()) else None)
    # the test report's tail coverage reflects the slots: restored, the same lists again
    again = run(opt, restore_system=True)
    assert again.test["longtail"]["metrics"] == result.test["longtail"]["metrics"]
    # with slots, the model's own lists are reported beside them, and compare shows both rows
    if chosen["slots"]:
        alone = result.test_variants["without_tail_slots"]
        assert alone["n_samples"] == result.test["longtail"]["n_samples"]
        assert alone["metrics"]["tail_coverage@50"] <= result.test["longtail"]["metrics"]["tail_coverage@50"]
        from lotcrs_plugin.compare import read_result_rows

        rows = read_result_rows(result.results_file)
        assert [r.config for r in rows] == [Path(result.results_file).stem,
                                            Path(result.results_file).stem + " (without tail slots)"]
        assert rows[1].get("recall@10") == alone["metrics"]["recall@10"]
        assert rows[0].get("commit") == result.commit
    else:
        assert "without_tail_slots" not in result.test_variants


def test_the_votes_own_pretraining_is_run_once_and_named(plugin, backbone_paths, lotcrs_home):
    from lotcrs_plugin.runner import run

    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False, run_name="t_knn_pre")
    opt["rerank"] = dict(knn_weight=0.5, knn_k=8, knn_pretrain={"run_name": "t_knn_own_pre", "dmp_weight": 0.0})
    run(opt)
    export = lotcrs_home / "save" / "t_knn_own_pre" / "backbone"
    assert (export / "config.json").is_file()
    done = json.loads((lotcrs_home / "save" / "t_knn_own_pre" / "pretrain.json").read_text())
    assert done["config"]["dmp_weight"] == 0.0 and done["config"]["max_steps"] == 2
    manifest = json.loads((lotcrs_home / "save" / "t_knn_pre" / "knn" / "knn.json").read_text())
    assert manifest["source"] == str(export)
    summary = json.loads((lotcrs_home / "save" / "t_knn_pre" / "finetune.json").read_text())
    assert summary["pretrained_from"] is None  # the recommender itself was not pre-trained
    # the vote's run name may not be the recommender's own pre-training
    bad = tiny_opt("bert", backbone_paths["bert"], run_name="t_knn_bad")
    bad["rerank"] = dict(knn_weight=0.5, knn_pretrain={"run_name": bad["lotcrs_pretrain"]["run_name"]})
    with pytest.raises(UserError, match="knn_pretrain.run_name"):
        run(bad)


def test_fixed_slots_report_the_models_own_lists_beside_them(plugin, backbone_paths, lotcrs_home):
    from lotcrs_plugin.compare import read_result_rows
    from lotcrs_plugin.runner import run

    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, retrieval=False, run_name="t_slots_fixed")
    opt["rerank"] = dict(knn_weight=0.0, knn_k=8, tail_slots={10: 2, 50: 10})
    result = run(opt)
    with_slots, alone = result.test["longtail"], result.test_variants["without_tail_slots"]
    assert alone["n_samples"] == with_slots["n_samples"]
    assert alone["metrics"]["tail_coverage@50"] < with_slots["metrics"]["tail_coverage@50"]
    rows = read_result_rows(result.results_file)
    stem = Path(result.results_file).stem
    assert [r.config for r in rows] == [stem, stem + " (without tail slots)"]
    assert rows[1].get("recall@10") == alone["metrics"]["recall@10"]
    assert rows[0].get("commit") == result.commit != ""
