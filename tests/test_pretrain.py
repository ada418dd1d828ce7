"""LOT-CRS pre-training: keyword masking, InfoNCE, samples and batches from dialogs, and the
CRSLab system (losses fall, a resumed run continues from its saved step) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lotcrs_plugin import config as run_config
from lotcrs_plugin import registry
from lotcrs_plugin.data.pretrain_samples import PretrainBatchSampler, PretrainData, cca_index, collate, dmp_index
from lotcrs_plugin.data.turns import tokenize_dialogs
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones import build_backbone
from lotcrs_plugin.model.pretrain_losses import IGNORE, info_nce, mask_keywords

from support import DIALOG_WORDS, DIALOGS, ENTITY2ID, ITEMS, build_system, tiny_bert

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "crslab_configs" / "lotcrs_pretrain_synthetic.yaml"
SMALL = {"n_items": 60, "n_conversations": 160, "seed": 3}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads stall each other
    (a tiny model's step takes 100x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- masking and InfoNCE ---------------------------------------------------------------------

def test_keyword_masking_statistics():
    g = torch.Generator().manual_seed(0)
    b, t, vocab = 512, 64, 30000
    ids = torch.randint(5, vocab, (b, t), generator=g)
    # keyword spans of 1-3 tokens; entity ids mark their first token
    starts = torch.rand(b, t, generator=g) < 0.12
    lengths = torch.randint(1, 4, (b, t), generator=g)
    keyword = torch.zeros(b, t, dtype=torch.bool)
    for k in range(3):
        shifted = torch.zeros_like(starts)
        shifted[:, k:] = (starts & (lengths > k))[:, : t - k]
        keyword |= shifted
    span_start = starts & keyword
    m = mask_keywords(ids, keyword, span_start, probability=0.9, mask_token_id=4, vocab_size=vocab,
                      generator=torch.Generator().manual_seed(1))
    sel = m.selected
    assert not (sel & ~keyword).any()                           # non-keywords are never selected
    assert torch.equal(m.input_ids[~keyword], ids[~keyword])     # ... nor changed
    assert torch.equal(m.labels[sel], ids[sel]) and (m.labels[~sel] == IGNORE).all()
    share = sel.sum().item() / keyword.sum().item()
    assert abs(share - 0.9) < 0.02, share
    masked = (m.input_ids == 4) & sel
    kept = (m.input_ids == ids) & sel
    random = sel & ~masked & ~kept
    n = sel.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(random.sum().item() / n - 0.1) < 0.015
    assert abs(kept.sum().item() / n - 0.1) < 0.015
    # a span is selected as a whole: a continuation token follows its span's start
    cont = keyword[:, 1:] & keyword[:, :-1] & ~span_start[:, 1:]
    assert torch.equal(sel[:, 1:][cont], sel[:, :-1][cont])
    # a generator makes it repeatable
    again = mask_keywords(ids, keyword, span_start, probability=0.9, mask_token_id=4, vocab_size=vocab,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.input_ids, m.input_ids)


def test_info_nce_pairs_and_same_target_columns():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    loss, acc = info_nce(z, z + 0.01 * torch.randn(8, 16), temperature=0.05)
    assert loss.item() < 0.05 and acc.item() == 1.0
    far, _ = info_nce(z, torch.randn(8, 16), temperature=0.05)
    assert far.item() > 1.0
    # rows 0 and 1 lead to the same item: each other's column is not a negative
    anchors = torch.randn(4, 16)
    anchors[1] = anchors[0]
    positives = anchors.clone()
    without, _ = info_nce(anchors, positives, 0.05)
    with_targets, _ = info_nce(anchors, positives, 0.05, targets=torch.tensor([7, 7, 1, 2]))
    assert with_targets.item() < 1e-3 < without.item()


# ---- samples from dialogs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_bert(tmp_path_factory):
    backbone = build_backbone("bert", str(tiny_bert(tmp_path_factory.mktemp("bert"), DIALOG_WORDS + ["1984", "1990"])))
    backbone.add_item_tokens(ITEMS.display_names, ITEMS.entity_ids)
    return backbone


def test_the_rust_backend_call_tokenizes_as_transformers_does(small_bert, tmp_path):
    """tokenize_dialogs calls a fast tokenizer's backend directly (half the time); ids and
    offsets equal transformers' own call, item tokens and byte-level BPE included."""
    from lotcrs_plugin.data.turns import _encode
    from lotcrs_plugin.model.backbones.base import ITEM_TOKEN
    from support import tiny_bart

    bart = build_backbone("bart", str(tiny_bart(tmp_path / "bart")))
    bart.add_item_tokens(ITEMS.display_names, ITEMS.entity_ids)
    texts = [" ".join(t["text"]) if isinstance(t["text"], list) else t["text"] for d in DIALOGS for t in d["dialog"]]
    texts += [f"you should watch {ITEM_TOKEN.format(1)} , or <item_0>  !", "", "  spaced   out  "]
    for bb in (small_bert, bart):
        assert bb.tokenizer.is_fast
        ids, offsets = _encode(bb.tokenizer, texts)
        enc = bb.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        assert [list(x) for x in ids] == enc["input_ids"]
        assert [[tuple(o) for o in x] for x in offsets] == [[tuple(o) for o in x] for x in enc["offset_mapping"]]
        assert {bb.first_item_id, bb.first_item_id + 1} <= set(ids[-3])  # item tokens found as tokens


def test_samples_mark_keywords_and_hide_the_target(small_bert):
    bb = small_bert
    tok = bb.tokenizer
    table = tokenize_dialogs(DIALOGS, tok, bb.sep_ids, ITEMS, ENTITY2ID)
    assert table.stats["items_found"] == table.stats["item_mentions"] == 3  # 'hidden echo' without its year too
    first = bb.first_item_id
    turn0 = table.ids[table.turn_offsets[0]:table.turn_offsets[1]]
    words = tok.convert_ids_to_tokens(turn0.tolist())
    assert words[-1] == "[SEP]"
    kw = table.keyword[table.turn_offsets[0]:table.turn_offsets[1]]
    ent = table.entity[table.turn_offsets[0]:table.turn_offsets[1]]
    assert [w for w, k in zip(words, kw) if k] == ["comedy", "anna", "berg"]
    assert [(w, e) for w, e in zip(words, ent) if e] == [("comedy", 3), ("anna", 4)]  # first token of a span
    turn1 = table.ids[table.turn_offsets[1]:table.turn_offsets[2]].tolist()
    assert first + 0 in turn1 and table.keyword[table.turn_offsets[1] + turn1.index(first)]
    # DMP: prefixes ending at turns with a keyword; the whole-dialog mode: one per dialog with one
    assert dmp_index(table).tolist() == [[0, 0], [0, 1], [0, 3], [4, 4], [4, 5]]
    assert dmp_index(table, "dialogs").tolist() == [[0, 3], [4, 5]]
    # CCA: both dialogs lead to Hidden Echo; contexts stop before its first mention
    cca = cca_index(table)
    assert cca.contexts.tolist() == [[0, 3], [4, 5]] and cca.targets.tolist() == [1, 1]
    data = PretrainData(table, bb.input_format(32), first, dmp=dmp_index(table), cca=cca)
    ids, kw_row, _, pos = data.cca_row(0)
    assert first + 1 not in ids.tolist() and ids[pos] == tok.mask_token_id and len(ids) <= 32
    assert tok.convert_ids_to_tokens(ids[-5:].tolist()) == ["you", "should", "watch", "[MASK]", "[SEP]"]
    assert not kw_row[-5:].any()
    # left truncation keeps the most recent turn
    short = PretrainData(table, bb.input_format(12), first, dmp=dmp_index(table), cca=cca)
    row = short.dmp_row(2)[0]
    assert len(row) == 12 and row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    assert first + 1 in row.tolist()


def test_batches_pad_dynamically_and_resume_at_any_batch(small_bert):
    bb = small_bert
    table = tokenize_dialogs(DIALOGS * 5, bb.tokenizer, bb.sep_ids, ITEMS, ENTITY2ID)
    data = PretrainData(table, bb.input_format(128), bb.first_item_id, dmp=dmp_index(table), cca=cca_index(table))
    rows = [data.dmp_row(i) for i in range(3)]
    batch = collate(rows, bb.pad_token_id, 8, 128)
    longest = max(len(r[0]) for r in rows)
    assert batch.input_ids.shape[1] == -(-longest // 8) * 8 < 128  # padded to the batch, not to max_length
    assert batch.attention_mask.sum(1).tolist() == [len(r[0]) for r in rows]
    assert (batch.input_ids[batch.attention_mask == 0] == bb.pad_token_id).all()

    def specs(start, epoch=0):
        s = PretrainBatchSampler(len(data.dmp), data.cca, 4, 3, seed=5, epoch=epoch, start=start)
        return [(spec.dmp.tolist(), spec.cca.tolist()) for [spec] in s]

    full = specs(0)
    assert len(full) == -(-len(data.dmp) // 4)
    assert specs(3) == full[3:]           # a resumed epoch yields the same remaining batches
    assert specs(0, epoch=1) != full      # each epoch its own order
    assert sorted(i for d, _ in full for i in d) == list(range(len(data.dmp)))
    for _, pairs in full:
        for a, p in pairs:
            assert a != p and data.cca.targets[a] == data.cca.targets[p]
    out = data[PretrainBatchSampler(len(data.dmp), data.cca, 4, 3, seed=5).__iter__().__next__()[0]]
    assert out.dmp.input_ids.shape[0] == 4 and out.cca.input_ids.shape[0] == 6 and out.cca_targets.shape == (3,)


def test_mlm_head_at_the_masked_positions_only_equals_the_full_head(small_bert):
    """masked_lm_loss runs the MLM head on the selected positions alone (lm_logits(hidden[where])):
    loss and gradients equal those of BertForMaskedLM's full (B, T, V) logits."""
    import torch.nn.functional as F

    from lotcrs_plugin.model.pretrain_losses import masked_lm_loss

    bb = small_bert
    table = tokenize_dialogs(DIALOGS * 3, bb.tokenizer, bb.sep_ids, ITEMS, ENTITY2ID)
    data = PretrainData(table, bb.input_format(64), bb.first_item_id, dmp=dmp_index(table), cca=cca_index(table))
    batch = collate([data.dmp_row(i) for i in range(len(data.dmp))], bb.pad_token_id, 8, 64)
    m = mask_keywords(batch.input_ids, batch.keyword_mask, batch.entity_ids > 0, probability=0.9,
                      mask_token_id=bb.mask_token_id, vocab_size=bb.vocab_size,
                      generator=torch.Generator().manual_seed(1))
    selected = int(m.selected.sum())
    assert 0 < selected < int(batch.attention_mask.sum()) // 2  # few scored positions among many tokens
    model = bb.model
    model.eval()  # no dropout: the two passes see the same states

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    masked = batch.replace(input_ids=m.input_ids)
    ours, acc = masked_lm_loss(bb.encode(masked), m.labels, bb.lm_logits)
    ours.backward()
    g_ours = grads()
    full_logits = model(input_ids=m.input_ids, attention_mask=batch.attention_mask).logits  # every token
    assert full_logits.shape[:2] == batch.input_ids.shape
    full = F.cross_entropy(full_logits.reshape(-1, full_logits.shape[-1]), m.labels.reshape(-1), ignore_index=IGNORE)
    full.backward()
    g_full = grads()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    assert set(g_ours) == set(g_full) and len(g_ours) > 10
    for name, g in g_full.items():
        torch.testing.assert_close(g_ours[name], g, rtol=1e-4, atol=1e-6, msg=name)
    model.train()


# ---- the config block ------------------------------------------------------------------------

def test_config_block_validation():
    from lotcrs_plugin.config_blocks.pretrain import PretrainConfig

    cfg = PretrainConfig.from_dict({"lr": 1, "batch_size": 8})
    assert cfg.lr == 1.0 and cfg.mlm_probability == 0.9 and cfg.temperature == 0.05 and cfg.max_length == 128
    with pytest.raises(UserError, match="unknown key 'epoch'; known keys: data, epochs"):
        PretrainConfig.from_dict({"epoch": 2})
    with pytest.raises(UserError, match="key 'batch_size' must be an integer"):
        PretrainConfig.from_dict({"batch_size": "16"})
    with pytest.raises(UserError, match="key 'pooling' must be one of cls, mean, first_last"):
        PretrainConfig.from_dict({"pooling": "max"})
    with pytest.raises(UserError, match="key 'bf16' must be true or false"):
        PretrainConfig.from_dict({"bf16": 1})
    with pytest.raises(UserError, match="key 'mlm_probability' must be in"):
        PretrainConfig.from_dict({"mlm_probability": 1.5})


# ---- the system ------------------------------------------------------------------------------

@pytest.fixture
def plugin(monkeypatch):
    """The pre-training parts in CRSLab's tables and the config (idempotent once the lead's
    registry and config lines are in)."""
    monkeypatch.setitem(run_config.PLUGIN_KEYS, "backbone", ((str,), None))
    monkeypatch.setitem(run_config.PLUGIN_KEYS, "backbone_path", ((str, dict), None))
    monkeypatch.setitem(run_config.CONFIG_BLOCKS, "lotcrs_pretrain", "lotcrs_plugin.config_blocks.pretrain:PretrainConfig")
    registry.register_all()
    from lotcrs_plugin.system import pretrain

    from lotcrs_plugin.model.pretrain import LOTCRSPretrainModel

    registry.register_model(pretrain.MODEL_NAME, LOTCRSPretrainModel)
    registry.register_system(pretrain.MODEL_NAME, pretrain.LOTCRSPretrainSystem)
    registry.register_dataloader(pretrain.MODEL_NAME, pretrain.LOTCRSPretrainDataLoader)
    return pretrain


@pytest.fixture(scope="module")
def synthetic_bert(tmp_path_factory) -> Path:
    """A tiny BERT whose vocabulary covers the small synthetic dataset and its simulation."""
    from lotcrs_plugin.data.simulator import load_simulated, simulate
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.dataset import ensure_generated

    root = tmp_path_factory.mktemp("vocab")
    folder = ensure_generated(SyntheticConfig(**SMALL), root / "dataset")
    dialogs = load_simulated(simulate(folder, {"per_item": 4, "cache_dir": str(root / "sim")}))
    dialogs += json.loads((folder / "train_data.json").read_text())
    words = {w for d in dialogs for t in d["dialog"] for w in t["text"]}
    return tiny_bert(root / "bert", sorted(words), dropout=0.0)  # no dropout: a probe sees what training did


def _opt(bert: Path, simulated: bool = True, **block) -> dict:
    opt = yaml.safe_load(CONFIG.read_text())
    opt["synthetic"] = dict(SMALL)
    if simulated:
        opt["simulation"] = {"per_item": 4}
    else:  # the dataset's own training dialogs: quicker
        opt.pop("simulation", None)
        block["data"] = "train"
    opt["backbone_path"] = str(bert)
    opt["lotcrs_pretrain"].update({"batch_size": 8, "grad_accumulation": 1, "lr": 0.01, "log_every": 2,
                                   "eval_max_batches": 2, **block})
    return opt


_system = build_system  # the CRSLab system of a config, built as `crslab run` builds it


def test_both_losses_fall_on_simulated_data(plugin, synthetic_bert, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    # mean pooling: a random tiny BERT's [CLS] state barely depends on the input at first
    system = _system(_opt(synthetic_bert, pooling="mean"))
    assert isinstance(system, plugin.LOTCRSPretrainSystem)
    system.build_optim()
    probe = [b for _, b in zip(range(2), system.loader("train", system.sampler("train", 0, shuffle=False)))]
    assert probe[0].dmp.keyword_mask.any() and probe[0].cca.input_ids.shape[0] == 16

    def losses() -> dict[str, float]:
        system.model.eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            out = [system.step(b, "pretrain", "probe", generator=generator) for b in probe]
        system.model.train()
        return {k: float(np.mean([float(o[k]) for o in out])) for k in ("dmp_loss", "cca_loss")}

    before = losses()
    for step in range(6):  # a few steps on the same two batches
        system.step(probe[step % 2], "pretrain", "train")
        system.optimizer_step()
    after = losses()
    assert after["dmp_loss"] < 0.85 * before["dmp_loss"], (before, after)
    assert after["cca_loss"] < before["cca_loss"] - 0.3, (before, after)


def test_resumed_run_continues_from_its_saved_step(plugin, synthetic_bert, lotcrs_home, monkeypatch):
    from lotcrs_plugin.runner import run

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    def opt(**block):
        return _opt(synthetic_bert, simulated=False, checkpoint_every=0, eval_max_batches=1, **block)

    straight = run(opt(run_name="straight", max_steps=4))
    first = run(opt(run_name="resumed", max_steps=2))
    save = lotcrs_home / "save"
    assert torch.load(save / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    second = run(opt(run_name="resumed", max_steps=4, resume=True))
    a = torch.load(save / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(save / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["batch_in_epoch"] == b["batch_in_epoch"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)
    for (ka, sa), (kb, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert ka == kb and sa["step"] == sb["step"]
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    # a finished run resumed again trains no further step (it stopped at max_steps inside an epoch)
    run(opt(run_name="resumed", max_steps=4, resume=True))
    c = torch.load(save / "resumed" / "checkpoint.pt", weights_only=True)
    assert c["step"] == 4 and c["batch_in_epoch"] == 4
    for key, value in b["model"].items():
        torch.testing.assert_close(c["model"][key], value, msg=key)
    # the export for fine-tuning, and the test losses in the run's report
    assert (save / "resumed" / "backbone" / "lotcrs_backbone.json").is_file()
    for result in (straight, first, second):
        optim = [r["optim"] for r in result.reports if r["mode"] == "test"][-1]
        assert optim["dmp_loss"] > 0 and optim["cca_loss"] > 0


def test_config_file_names_registered_parts(plugin):
    opt = run_config.validate(yaml.safe_load(CONFIG.read_text()), where=str(CONFIG))
    registry.register_all()
    run_config.check_names(opt, where=str(CONFIG))
    assert opt["model"] == plugin.MODEL_NAME and opt["backbone"] == "bert"
    bad = dict(opt, lotcrs_pretrain={"epochs": "two"})
    with pytest.raises(UserError, match="block 'lotcrs_pretrain': key 'epochs' must be an integer"):
        run_config.validate(bad)


def test_progress_total_is_the_batches_that_run(plugin, synthetic_bert, lotcrs_home, monkeypatch):
    """The bar of every epoch counts to where it really ends (max_steps cuts the second short),
    so its ETA is true; the log's step total is max_steps."""
    import tqdm.auto

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.total_shown, self.n_shown = kwargs.get("total"), kwargs.get("initial", 0)
            if str(kwargs.get("desc", "")).startswith("pretrain epoch"):  # not the model files' bars
                bars.append(self)

        def update(self, n=1):  # a disabled tqdm counts nothing: count here, as the shown bar would
            self.n_shown += n
            self.n = self.n_shown

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    system = _system(_opt(synthetic_bert, simulated=False, run_name="bars", epochs=3, grad_accumulation=2,
                          checkpoint_every=0, eval_max_batches=1))
    system.build_optim()
    per_epoch = system.sampler("train", 0).n_batches
    assert per_epoch >= 4, per_epoch
    max_steps = system.steps_per_epoch() + 1  # the whole first epoch, one step of the second
    system = _system(_opt(synthetic_bert, simulated=False, run_name="bars", epochs=3, grad_accumulation=2,
                          checkpoint_every=0, eval_max_batches=1, max_steps=max_steps))
    ran = []
    step = type(system).step

    def counting(self, batch, stage="pretrain", mode="train", *args, **kwargs):
        if mode == "train":
            ran.append(self.epoch)
        return step(self, batch, stage, mode, *args, **kwargs)

    monkeypatch.setattr(type(system), "step", counting)
    system.fit()
    assert system.global_step == max_steps and system.last_step == max_steps < system.total_steps
    assert [b.total_shown for b in bars] == [ran.count(0), ran.count(1)] == [per_epoch, 2]
    assert [b.n_shown for b in bars] == [b.total_shown for b in bars]  # each bar ends full
    assert len(ran) == per_epoch + 2
