"""LOT-CRS fine-tuning (lotcrs_plugin.system.lotcrs): the whole pipeline (pre-training -> memory
store -> teacher -> fine-tuning -> long-tail test) through lotcrs_plugin.runner.run for every
backbone, on tiny models built from configs and a tiny synthetic dataset; fusion and label
smoothness inside the model; samples; best epoch on validation; save / restore / resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lotcrs_plugin import config as run_config
from lotcrs_plugin.errors import UserError

from support import DEMO, PAPER_HEAD, SMALL, assert_longtail_in_range, build_system, tiny_opt

CONFIGS = Path(__file__).resolve().parents[1] / "crslab_configs"
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the whole pipeline ----------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["bart", "unicrs"])
def test_pipeline_runs_for_backbone(plugin, backbone_paths, lotcrs_home, backbone):
    from lotcrs_plugin.runner import run

    result = run(tiny_opt(backbone, backbone_paths[backbone]))
    report = result.test["longtail"]
    assert_longtail_in_range(report)
    unmentioned = report["subsets"]["unmentioned"]
    assert 0 < unmentioned["n_samples"] <= report["n_samples"]
    summary = json.loads((lotcrs_home / "save" / f"t_{backbone}" / "finetune.json").read_text())
    assert summary["pretrained_from"].endswith(f"t_{backbone}_pre/backbone")
    assert summary["store_entries"] == SMALL["n_items"] * 2 and summary["teacher"] == "simulated"


def test_bert_pipeline_selects_on_validation_and_restores(plugin, backbone_paths, lotcrs_home):
    """Best epoch on validation, the tested model is that epoch's, and --restore-system tests the
    saved system to the same numbers."""
    from lotcrs_plugin.runner import run

    opt = tiny_opt("bert", backbone_paths["bert"], epochs=3, store_refresh="epoch")
    opt["model_file"] = "t_bert_system.pth"
    result = run(opt, save_system=True)
    report = result.test["longtail"]
    assert_longtail_in_range(report)
    assert set(report["subsets"]) == {"unmentioned"}
    run_dir = lotcrs_home / "save" / "t_bert"
    summary = json.loads((run_dir / "finetune.json").read_text())
    scores = [h["score"] for h in summary["history"]]
    assert len(scores) == 3
    best = int(np.argmax(scores))  # the first of equal scores: ties keep the earlier epoch
    assert summary["selection"]["best_epoch"] == best == result.selection["selected_epoch"]
    saved = torch.load(lotcrs_home / "save" / "t_bert_system.pth", weights_only=True)["model_state_dict"]
    best_state = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    for key, value in best_state.items():  # the saved (tested) model is the best epoch's
        torch.testing.assert_close(saved[key], value, msg=key)
    if best != 2:
        last = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
        assert any(not torch.equal(last[k], v) for k, v in best_state.items())
    # the test split never reached the choice: its report is the only test-mode one
    assert [r["mode"] for r in result.reports if r.get("longtail")].count("test") == 1

    again = run(opt, restore_system=True)
    assert again.test["longtail"]["metrics"] == report["metrics"]
    assert again.test["longtail"]["subsets"] == report["subsets"]


def test_resume_continues_after_the_last_epoch(plugin, backbone_paths, lotcrs_home):
    from lotcrs_plugin.runner import run

    base = dict(pretrain=False, run_name="t_resume", impatience=0)
    one = run(tiny_opt("bert", backbone_paths["bert"], epochs=1, **base))
    ckpt = lotcrs_home / "save" / "t_resume" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    two = run(tiny_opt("bert", backbone_paths["bert"], epochs=2, resume=True, **base))
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [0, 1]
    # the resumed run re-reported its earlier best epoch (0), so the selection hook knows it
    assert [h["epoch"] for h in two.selection["history"]] == [0, 1]
    assert two.selection["selected_epoch"] == state["best_epoch"]
    assert_longtail_in_range(two.test["longtail"])
    assert one.test["longtail"]["n_samples"] == two.test["longtail"]["n_samples"]


def test_an_interrupted_run_resumes_to_the_numbers_of_a_straight_run(plugin, backbone_paths, lotcrs_home,
                                                                     monkeypatch):
    """Stopped after its first epoch's checkpoint, a run resumed from it (loaded with
    weights_only=True) ends with the same weights and test metrics as a run that was never stopped;
    a checkpoint that holds a pickled object is refused with one line."""
    from lotcrs_plugin.runner import run
    from lotcrs_plugin.system.finetune import FineTuner

    base = dict(pretrain=False, impatience=0, epochs=2, max_train_batches=3, store_refresh="epoch")
    straight = run(tiny_opt("bert", backbone_paths["bert"], run_name="t_straight", **base))
    save = FineTuner.save_checkpoint

    def crash_after_the_first_epoch(self, extra):
        path = save(self, extra)
        if self.epoch == 1:
            raise KeyboardInterrupt("stopped after epoch 0")
        return path

    monkeypatch.setattr(FineTuner, "save_checkpoint", crash_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_opt("bert", backbone_paths["bert"], run_name="t_stopped", **base))
    monkeypatch.setattr(FineTuner, "save_checkpoint", save)
    ckpt = lotcrs_home / "save" / "t_stopped" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = run(tiny_opt("bert", backbone_paths["bert"], run_name="t_stopped", resume=True, **base))
    assert resumed.test["longtail"]["metrics"] == straight.test["longtail"]["metrics"]
    assert resumed.selection["history"] == straight.selection["history"]
    a = torch.load(lotcrs_home / "save" / "t_straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    torch.testing.assert_close(a["rng"]["torch"], b["rng"]["torch"], rtol=0, atol=0)

    import argparse

    torch.save({**b, "history": argparse.Namespace(epochs=2)}, ckpt)  # an object only unpickling makes
    with pytest.raises(UserError, match="not loadable as plain tensors and numbers"):
        run(tiny_opt("bert", backbone_paths["bert"], run_name="t_stopped", resume=True, **base))


# ---- inside the model ------------------------------------------------------------------------

@pytest.fixture
def bert_system(plugin, backbone_paths):
    system = build_system(tiny_opt("bert", backbone_paths["bert"], PAPER_HEAD, pretrain=False))
    torch.manual_seed(0)
    return system


def test_fusion_moves_the_scores_towards_the_retrieved_values(bert_system):
    system = bert_system
    model = system.model
    store = system.build_store()
    model.eval()
    batch = next(iter(system.batches(system.data("test"), train=False, batch_size=8)))
    with torch.no_grad():
        out = model(batch.tokens)
        assert out.retrieved is not None and out.retrieved.values.shape == (8, 4, model.backbone.hidden_size)
        # the scores are the verbaliser on LayerNorm(h + w * attention) at the mask
        attended, weights = model.fusion.attend(out.states[:, None], out.retrieved.values, out.retrieved.mask)
        fused = model.fusion.layer_norm(out.states[:, None] + model.fusion.weight * attended)[:, 0]
        torch.testing.assert_close(out.logits, model.backbone.item_logits(fused))
        assert torch.allclose(weights.sum(-1), torch.ones(8, 1))
        model.store = None
        plain = model(batch.tokens).logits
        assert not torch.allclose(plain, out.logits)
        assert torch.equal(plain, model.backbone.item_logits(out.states))
        # with a large weight, retrieving one value v makes the prediction that of v
        v = torch.from_numpy(store.values[0])
        steer = model.backbone.item_logits(model.fusion.layer_norm(v)[None]).argmax(-1)
        model.fusion.weight = 1e4
        steered = model.fusion(out.states[:, None], v.expand(8, 1, -1))[:, 0]
        assert (model.backbone.item_logits(steered).argmax(-1) == steer).all()
        assert (plain.argmax(-1) != steer).any()
        # the query is the store's key space: pooled from encode() equals the backbone's own pooling
        hidden = model.backbone.encode(batch.tokens)
        torch.testing.assert_close(model.represent(batch.tokens, hidden),
                                   model.backbone.context_representation(batch.tokens, model.pooling))


def test_recommend_scores_a_dialog_as_its_sample(bert_system):
    system = bert_system
    system.build_store()
    test = system.data("test")
    first, cut = test.index.contexts[0]
    dialog = system.dialogs("test")[int(test.index.dialogs[0])]["dialog"]
    top = system.recommend(dialog[:cut - first], k=10)
    system.model.eval()
    with torch.no_grad(), system._autocast():  # as recommend() scores (bf16 where the CPU has it: near-ties)
        logits = system.model(test[np.array([0])].tokens).logits[0].float()
    # the same scores in the same order; items with equal bf16 scores may come in either order
    assert logits[top].tolist() == logits.topk(10).values.tolist() and len(set(top)) == 10
    # with the vote's tail slots, the interactive list is the test list
    from dataclasses import replace
    system.rerank.cfg = system.model.rerank_cfg = replace(system.rerank_cfg, knn_k=8)
    system.model.tail_items = torch.as_tensor(system.evaluator.catalog.is_tail)
    system.build_knn().tail_slots = {10: 4}
    top = system.recommend(dialog[:cut - first], k=10)
    with torch.no_grad(), system._autocast():
        listed = system.model.rank_items(test[np.array([0])].tokens, None, 50, 1 << 20).top_ids[0, :10].tolist()
    assert top == listed and top[:6] == logits.topk(6).indices.tolist() and top[6:] != logits.topk(10).indices.tolist()[6:]
    assert all(system.model.tail_items[i] for i in top[6:])


def test_label_smoothness_pulls_the_student_towards_the_teacher(bert_system):
    from lotcrs_plugin.model.smoothing import TeacherScores

    system = bert_system
    system.model.fusion = None  # smoothing alone
    train = system.data("train")
    batch = next(iter(system.batches(train, train=False, batch_size=16)))
    favourite = int((batch.targets.max() + 1) % len(system.model.items))  # not a target of the batch
    start = copy.deepcopy(system.model.state_dict())
    logits = torch.full((len(train), len(system.model.items)), -20.0)
    logits[:, favourite] = 20.0
    teacher = TeacherScores.from_logits(logits, kind="simulated")

    def p_favourite(beta: float) -> float:
        system.model.load_state_dict(start)
        system.tuner.smoothing_cfg = type(system.smoothing_cfg)(beta=beta, teacher="simulated")
        system.tuner.teacher = teacher if beta else None
        system.build_optim()
        system.model.train()
        for _ in range(3):
            torch.manual_seed(0)  # the same dropout in both runs
            system.step(batch, "rec", "train")
            system.optimizer_step()
        system.model.eval()
        with torch.no_grad():
            return float(torch.softmax(system.model(batch.tokens).logits, -1)[:, favourite].mean())

    assert p_favourite(2.0) > 2 * p_favourite(0.0)


# ---- samples ---------------------------------------------------------------------------------

def test_recommendation_samples_and_the_mentioned_flag(tmp_path):
    from lotcrs_plugin.data.finetune_samples import RecData, recommendation_index, simulated_index, turn_roles
    from lotcrs_plugin.data.turns import tokenize_dialogs
    from lotcrs_plugin.model.backbones import build_backbone

    from support import DIALOGS, ENTITY2ID, ITEMS, tiny_bert

    dialogs = copy.deepcopy(DIALOGS)
    # dialog a: the Recommender names item 0 (turn 1) and then items 1, 0 and 1 again (turn 3)
    dialogs[0]["dialog"][3]["movies"] = ["Hidden Echo (1984)", "Secret River (1990)", "Hidden Echo (1984)"]
    words = [w for d in dialogs for t in d["dialog"] for w in t["text"]]
    bb = build_backbone("bert", str(tiny_bert(tmp_path, words + ["1984", "1990"])))
    bb.add_item_tokens(ITEMS.display_names, ITEMS.entity_ids)
    table = tokenize_dialogs(dialogs, bb.tokenizer, bb.sep_ids, ITEMS, ENTITY2ID)
    index = recommendation_index(table, turn_roles(dialogs))
    # turn 1: item 0; turn 3: items 1 and 0 once each (0 was named before); dialog b: item 1
    assert index.contexts.tolist() == [[0, 1], [0, 3], [0, 3], [4, 5]]
    assert index.targets.tolist() == [0, 1, 0, 1]
    assert index.mentioned.tolist() == [False, False, True, False]
    data = RecData(table, bb.input_format(32), bb.first_item_id, index)
    ids, _, _, pos = data.row(2)
    assert ids[pos] == bb.mask_token_id and bb.first_item_id + 0 in ids.tolist()  # a repeat stays visible
    sim = simulated_index(table)  # the target (last item named) is masked in its context
    sim_data = RecData(table, bb.input_format(32), bb.first_item_id, sim)
    for i in range(len(sim)):
        assert bb.first_item_id + sim.targets[i] not in sim_data.row(i)[0].tolist()
    batch = data[np.array([3, 0])]
    assert batch.sample_idx.tolist() == [3, 0] and batch.mentioned.tolist() == [False, False]
    assert (batch.tokens.input_ids[torch.arange(2), batch.tokens.mask_positions] == bb.mask_token_id).all()


# ---- configs ---------------------------------------------------------------------------------

def test_config_block_validation(plugin):
    from lotcrs_plugin.config_blocks.finetune import FinetuneConfig

    cfg = FinetuneConfig.from_dict({"lr": 1, "epochs": 3})
    assert cfg.lr == 1.0 and cfg.max_length == 256 and cfg.pretrain and cfg.retrieval
    with pytest.raises(UserError, match="unknown key 'epoch'; known keys: pretrain, retrieval"):
        FinetuneConfig.from_dict({"epoch": 2})
    with pytest.raises(UserError, match="key 'store_refresh' must be fixed or epoch"):
        FinetuneConfig.from_dict({"store_refresh": "never"})
    with pytest.raises(UserError, match="key 'retrieval' must be true or false"):
        FinetuneConfig.from_dict({"retrieval": "no"})


def test_every_lotcrs_config_file_validates(plugin, home_with_config_models):
    files = sorted(CONFIGS.glob("lotcrs_*.yaml")) + sorted(CONFIGS.glob("lotcrs_*/*.yaml")) + [DEMO]
    assert len([f for f in files if f.parent == CONFIGS and "pretrain" not in f.name]) >= 6
    for path in files:
        opt = run_config.validate(run_config.read_yaml(path), where=str(path))
        if opt.get("model") == "LOTCRS":
            assert opt["backbone"] in ("bert", "bart", "unicrs"), path
            assert opt["evaluator"] == "longtail", path
    with pytest.raises(UserError, match="block 'lotcrs': key 'epochs' must be an integer"):
        run_config.validate(dict(yaml.safe_load(DEMO.read_text()), lotcrs={"epochs": "two"}))
    # a kNN or tail-slot key in its old place (retrieval:) names its new one
    with pytest.raises(UserError, match=r"block 'retrieval': key 'tail_slots' belongs to the rerank: block now.*"
                                        r"move it to rerank\.tail_slots$"):
        run_config.validate(dict(yaml.safe_load(DEMO.read_text()), retrieval={"tail_slots": "auto"}))


def test_bf16_autocast_ranks_as_fp32_within_tolerance(bert_system):
    """The bf16 path (autocast, as on CPUs with AVX512_BF16 / AMX and on CUDA) ranks the catalog as
    the fp32 path does, within a stated tolerance: scores within 5% of their spread, top-10 lists
    sharing at least 9 of 10 items on average, the target's rank moved by at most 2% of the catalog
    on average, and recall@10 within one sample in 20."""
    system = bert_system
    model = system.model
    system.build_optim()
    train = system.data("train")
    for batch in system.batches(train, train=True, epoch=0, limit=6):  # fp32 steps: scores that mean something
        system.tuner.train_step(batch.to(system.device))
        system.optimizer_step()
    model.eval()
    test = system.data("test")
    n_items = len(model.items)
    runs = {}
    for bf16 in (False, True):
        logits, ranks, tops = [], [], []
        for batch in system.batches(test, train=False, batch_size=64):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(batch.tokens).logits.float()
            logits.append(out)
            target = out.gather(1, batch.targets[:, None])
            ranks.append((out > target).sum(1))
            tops.append(out.topk(10).indices)
        runs[bf16] = torch.cat(logits), torch.cat(ranks).float(), torch.cat(tops)
    (l32, r32, t32), (l16, r16, t16) = runs[False], runs[True]
    assert l32.shape == (len(test), n_items) and len(test) >= 20
    assert not torch.equal(l32, l16)  # the bf16 path did run in bf16
    spread = float(l32.std())
    assert float((l32 - l16).abs().max()) <= 0.05 * spread, (float((l32 - l16).abs().max()), spread)
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(t32, t16)]).float()
    assert float(overlap.mean()) >= 9.0, overlap
    assert float((r32 - r16).abs().mean()) <= 0.02 * n_items
    assert abs(float((r32 < 10).float().mean()) - float((r16 < 10).float().mean())) <= 0.05


def test_fine_tuning_progress_total_is_the_batches_that_run(bert_system, monkeypatch):
    import tqdm.auto

    bars, ran = [], []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, iterable=None, *args, **kwargs):
            super().__init__(iterable, *args, **{**kwargs, "disable": True})
            if str(kwargs.get("desc", "")).startswith("fine-tune epoch"):
                bars.append(kwargs["total"])

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    system = bert_system
    step = system.tuner.train_step
    monkeypatch.setattr(system.tuner, "train_step", lambda batch, scale=1.0: ran.append("train") or step(batch, scale))
    system.build_optim()
    system.tuner.train_epoch()
    assert bars == [len(ran)] == [system.tuner.train_batches()] == [2]  # max_train_batches: 2 of the epoch's batches
