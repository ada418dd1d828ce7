"""lotcrs_plugin.compat: each patch cures its symptom, and the symptom is there without it.

`test_symptoms_without_patches` runs one subprocess with the patches left out (compat.apply's
`skip`) and asserts that every symptom shows; the other tests run in this process with all
patches applied. The recommender tests train and evaluate CRSLab's own models through their
own systems and dataloaders on a tiny hand-made dataset.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import math
import os
import random
import subprocess
import sys
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lotcrs_plugin import compat, paths
from lotcrs_plugin.compat import evaluators as compat_evaluators
from lotcrs_plugin.compat.imports import fasttext_available
from lotcrs_plugin.compat.models import kgsf_copy_mask
from lotcrs_plugin.compat.rebind import ORIGINALS
from lotcrs_plugin.compat.resources import register_local_resource, safe_build
from lotcrs_plugin.errors import UserError

compat.apply()

import crslab.download  # noqa: E402  (after compat.apply)
from crslab.config import Config  # noqa: E402
from crslab.data import get_dataloader  # noqa: E402
from crslab.system import get_system  # noqa: E402

N_ITEMS = 60  # CRSLab ranks top-50 items
WORDS = ("i like movies the a good film you should watch it is great what do want see scary "
         "funny love action drama recommend thanks yes no maybe one more bye").split()
DEAD_URL = "http://127.0.0.1:9/unreachable.zip"  # connection refused at once, no network used


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path, monkeypatch) -> paths.Layout:
    """CRSLab's paths in every loaded crslab module point under tmp_path; restored afterwards."""
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "home"))
    monkeypatch.setattr(paths, "_active", paths._active)
    keys = paths.Layout(tmp_path).crslab_constants()
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "crslab" or name.startswith("crslab.")):
            for key in keys:
                if key in vars(module):
                    monkeypatch.setattr(module, key, getattr(module, key))
    return paths.apply_to_crslab(tmp_path / "home")


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory) -> dict[str, str]:
    """A tiny BERT and a tiny GPT-2 saved with save_pretrained, sized for the tiny vocabulary."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("pretrained")
    vocab_size = len(WORDS) + 4
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(base / "bert")
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(base / "gpt2")
    return {"bert": str(base / "bert"), "gpt2": str(base / "gpt2")}


@pytest.fixture
def loguru_messages():
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


# ---- a tiny dataset in CRSLab's processed form -----------------------------------------------

def tiny_data():
    """vocab, side_data and processed samples as CRSLab's ReDial dataset produces them."""
    tok2ind = {"__pad__": 0, "__start__": 1, "__end__": 2, "__unk__": 3}
    for w in WORDS:
        tok2ind[w] = len(tok2ind)
    entity2id = {f"movie_{i}": i for i in range(1, N_ITEMS + 1)}
    entity2id.update({f"genre_{g}": N_ITEMS + 1 + g for g in range(4)})
    n_entity = max(entity2id.values()) + 1
    word2id = {f"c{i}": i for i in range(1, 9)}
    vocab = {"tok2ind": tok2ind, "ind2tok": {i: t for t, i in tok2ind.items()}, "entity2id": entity2id,
             "id2entity": {i: e for e, i in entity2id.items()}, "word2id": word2id,
             "vocab_size": len(tok2ind), "n_entity": n_entity, "n_word": 9,
             "pad": 0, "start": 1, "end": 2, "unk": 3, "pad_entity": 0, "pad_word": 0}
    edges = {(e, e, 2) for e in range(1, n_entity)}  # self loops, as ReDial adds
    for i in range(1, N_ITEMS + 1):
        genre, nxt = N_ITEMS + 1 + i % 4, i % N_ITEMS + 1
        edges |= {(i, genre, 0), (genre, i, 0), (i, nxt, 1), (nxt, i, 1)}
    word_edges = {(a, a % 8 + 1) for a in range(1, 9)} | {(a % 8 + 1, a) for a in range(1, 9)}
    side = {"entity_kg": {"edge": sorted(edges), "n_relation": 3, "entity": list(entity2id)},
            "word_kg": {"edge": sorted(word_edges), "entity": list(word2id)},
            "item_entity_ids": list(range(1, N_ITEMS + 1))}
    rng = random.Random(0)

    def utterance():
        return [rng.randrange(4, len(tok2ind)) for _ in range(rng.randint(2, 6))]

    def samples(n):
        return [{"role": "Recommender" if k % 3 else "Seeker",
                 "context_tokens": [utterance() for _ in range(rng.randint(1, 3))],
                 "response": utterance(),
                 "context_entities": rng.sample(range(1, n_entity), rng.randint(0, 3)),
                 "context_words": rng.sample(range(1, 9), rng.randint(0, 3)),
                 "context_items": rng.sample(range(1, N_ITEMS + 1), rng.randint(0, 3)),
                 "items": rng.sample(range(1, N_ITEMS + 1), 2)} for k in range(n)]

    return vocab, side, {"train": samples(8), "valid": samples(4), "test": samples(4)}


def config(opt: dict) -> Config:
    """A crslab Config without its side effects (./log, logger.remove())."""
    opt = {"dataset": "ReDial", "gpu": [-1], **opt}
    models = [opt[k] for k in ("rec_model", "conv_model", "policy_model") if k in opt]
    opt["model_name"] = opt.get("model") or "_".join(models)
    cfg = Config.__new__(Config)
    cfg.opt = opt
    return cfg


TRANSFORMER = dict(token_emb_dim=16, kg_emb_dim=16, num_bases=2, n_heads=2, n_layers=1, ffn_size=16,
                   dropout=0.1, attention_dropout=0.0, relu_dropout=0.1, learn_positional_embeddings=False,
                   embeddings_scale=True, reduction=False, n_positions=64, user_proj_dim=16)
SASREC = dict(hidden_dropout_prob=0.1, initializer_range=0.02, hidden_size=16, max_history_items=20,
              num_attention_heads=1, attention_probs_dropout_prob=0.1, hidden_act="gelu", num_hidden_layers=1)


def stage(**more) -> dict:
    return {"epoch": 1, "batch_size": 4, "optimizer": {"name": "AdamW", "lr": 1e-3}, "lr_bert": 1e-4,
            "early_stop": True, "impatience": 3, "stop_mode": "max", **more}


LINEAR = {"lr_scheduler": {"name": "TransformersLinearLR", "warmup_steps": 2}}
# model options (small sizes), and optimisation as in CRSLab's configs (schedulers, clipping)
CASES: dict[str, dict] = {
    "TextCNN": dict(rec_model="TextCNN", num_filters=8, embed=16, filter_sizes="(2, 3)", dropout=0.1),
    "SASREC": dict(rec_model="SASREC", **SASREC),
    "GRU4REC": dict(rec_model="GRU4REC", gru_hidden_size=16, num_layers=1, dropout_hidden=0.0,
                    dropout_input=0, embedding_dim=16, batch_size=4),
    "BERT": dict(rec_model="BERT"),
    "Popularity": dict(rec_model="Popularity"),
    "KBRD": dict(model="KBRD", **TRANSFORMER, conv=stage(stop_mode="min")),
    "KGSF": dict(model="KGSF", **TRANSFORMER, pretrain=stage(),
                 conv=stage(stop_mode="min", gradient_clip=0.1,
                            lr_scheduler={"name": "ReduceLROnPlateau", "patience": 3, "factor": 0.5})),
    "ReDialRec": dict(rec_model="ReDialRec", conv_model="ReDialConv", autorec_layer_sizes=[16],
                      autorec_f="sigmoid", autorec_g="sigmoid", embedding_dim=16,
                      utterance_encoder_hidden_size=16, dialog_encoder_hidden_size=16,
                      dialog_encoder_num_layers=1, use_dropout=False, dropout=0.1, decoder_hidden_size=16,
                      decoder_num_layers=1, decoder_embedding_dim=16, utterance_truncate=16,
                      conversation_truncate=8, rec=stage(stop_mode="min"), conv=stage(stop_mode="min")),
    "TGRec": dict(rec_model="TGRec", conv_model="TGConv", **SASREC,
                  conv=stage(stop_mode="min", gradient_clip=1.0, update_freq=2, **LINEAR)),
    "InspiredRec": dict(rec_model="InspiredRec", conv_model="InspiredConv",
                        conv=stage(stop_mode="min", **LINEAR)),
}


def build_system(name: str, pretrained: dict[str, str]):
    vocab, side, data = tiny_data()
    opt = {"context_truncate": 32, "response_truncate": 12, "item_truncate": 10, "entity_truncate": 10,
           "word_truncate": 10, "scale": 1, "pretrained_path": pretrained, "rec": stage()}
    opt.update(copy.deepcopy(CASES[name]))
    cfg = config(opt)
    split = "model" not in cfg.opt
    loaders = {}
    for part in ("train", "valid", "test"):
        if split:
            loaders[part] = {s: get_dataloader(cfg, copy.deepcopy(data[part]), vocab) for s in ("rec", "conv")}
        else:
            loaders[part] = get_dataloader(cfg, copy.deepcopy(data[part]), vocab)
    if split:
        vocab, side = {"rec": vocab, "conv": vocab}, {"rec": side, "conv": side}
    return get_system(cfg, loaders["train"], loaders["valid"], loaders["test"], vocab, side)


# ---- without the patches: every symptom shows ------------------------------------------------

SYMPTOMS_SCRIPT = r'''
import json, os, sys
from pathlib import Path
out = {}
def error(fn):
    try:
        fn()
    except BaseException as e:
        return f"{type(e).__name__}: {e}"
    return None

# import-time patches
def import_evaluator():
    import crslab.evaluator
try:
    import fasttext
    out["fasttext"] = "installed"
except ImportError:
    out["fasttext"] = error(import_evaluator)
from lotcrs_plugin import compat, paths
POST = set(compat.POST_IMPORT_PATCHES)
out["adamw"] = error(lambda: compat.apply(skip={"adamw"} | POST))
compat.apply(skip=POST)
root = Path(sys.argv[1])
layout = paths.apply_to_crslab(root / "home")
os.chdir(root / "cwd")

import numpy as np, torch
torch.manual_seed(0)
from transformers import GPT2Config, GPT2LMHeadModel
from crslab.config import Config
def cfg(opt):
    c = Config.__new__(Config); c.opt = {"dataset": "ReDial", "gpu": [-1], **opt}; return c

from crslab.model.utils.modules.transformer import TransformerEncoder
out["position_codes"] = error(lambda: TransformerEncoder(2, 1, 16, 16, 30, torch.nn.Embedding(30, 16), n_positions=32))

from crslab.system.utils.lr_scheduler import ReduceLROnPlateau
opt_ = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
out["plateau"] = error(lambda: ReduceLROnPlateau(opt_, patience=3, factor=0.5))

from crslab.evaluator.metrics.base import AverageMetric
out["as_number"] = error(lambda: AverageMetric(np.float32(0.5)))

# BaseSystem.backward: gradient of 3*w at w with loss value L is L*3
from crslab.system.base import BaseSystem
from crslab.evaluator.rec import RecEvaluator
class Bare(BaseSystem):
    fit = step = interact = lambda *a: None
s = object.__new__(Bare)
w = torch.nn.Parameter(torch.tensor([2.0]))
s.update_freq, s._number_grad_accum, s.gradient_clip, s.parameters = 1, 0, -1, [w]
s.optimizer = torch.optim.SGD([w], lr=0.0); s.evaluator = RecEvaluator()
s.backward((3 * w).sum())
out["backward"] = w.grad.item()

RecEvaluator(tensorboard=True).writer.close()
out["tensorboard_dir"] = sorted(os.listdir("."))

import nltk
calls = []
nltk.download = lambda *a, **k: calls.append(a) or False
error(lambda: BaseSystem.nltk_tokenize(None, "I like it. You too!"))
out["nltk_offline"] = calls

# TextCNN: raw oneDNN bug present on this machine?  (the patch is a no-op elsewhere)
import torch.nn.functional as F
def wgrad_error(model_grad, inp, k):
    ref = F.unfold(inp.double(), k).sum(dim=(0, 2))
    return (model_grad.reshape(-1).double() - ref).abs().max().item()
conv = torch.nn.Conv2d(1, 4, (3, 16)); inp = torch.randn(4, 1, 32, 16)
conv(inp).sum().backward()
out["conv2d_bug_here"] = not wgrad_error(conv.weight.grad[0], inp, (3, 16)) <= 1e-2  # NaN counts
from crslab.model.recommendation.textcnn.textcnn import TextCNNModel
m = TextCNNModel(cfg(dict(num_filters=4, embed=16, filter_sizes="(3,)", dropout=0.0)), torch.device("cpu"),
                 {"n_entity": 40}, {})
x = torch.randn(4, 1, 32, 16)
m.conv_and_pool(x, m.convs[0]).sum().backward()
# d(sum of max-pooled relu outputs)/dW is not a plain sum; compare against float64 autograd instead
w64 = m.convs[0].weight.detach().double().requires_grad_(True)
h = F.relu(F.conv2d(x.double(), w64, m.convs[0].bias.detach().double())).squeeze(3)
F.max_pool1d(h, h.size(2)).sum().backward()
out["textcnn_conv1d"] = (m.convs[0].weight.grad.double() - w64.grad).abs().max().item()

# InspiredConv with a tiny GPT-2 placed where CRSLab downloads it (its .built: no download)
gpt2 = Path(layout.pretrain) / "gpt2" / "en"
GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
(gpt2 / ".built").write_text("x\n0.1")
from crslab.model.crs.inspired.inspired_conv import InspiredConvModel
ic = InspiredConvModel(cfg({"context_truncate": 8, "response_truncate": 6, "conv": {}}), torch.device("cpu"),
                       {"pad": 0}, {})
batch = (torch.tensor([0, 1]), torch.randint(1, 30, (2, 14)), torch.randint(1, 30, (2, 8)), None)
out["gpt2_cache"] = error(lambda: ic.converse(batch, "train"))

# evaluator with fastText vectors in place (a .built) but no fasttext package
emb = Path(layout.embedding) / "en"; emb.mkdir(parents=True); (emb / ".built").write_text("x\n0.2")
from crslab.evaluator.standard import StandardEvaluator
out["embedding_metrics"] = error(lambda: StandardEvaluator("en"))  # with fasttext: no .bin file

from crslab.evaluator import get_evaluator
out["conv_evaluator"] = error(lambda: get_evaluator("conv", "ReDial"))

# build() on a user's folder whose .built names another version: deleted
import crslab.download
user = root / "user_data"; user.mkdir(); (user / "notes.txt").write_text("mine"); (user / ".built").write_text("x\n0.1")
class Offline(crslab.download.DownloadableFile):
    def download_file(self, dpath):
        raise RuntimeError("offline")
error(lambda: crslab.download.build(str(user), Offline("u", "f.zip", "0"), "0.31"))
out["safe_build"] = sorted(os.listdir(user)) if user.exists() else None

# KBRD (position codes patched): two users with different entities
compat.apply(skip=POST - {"position_codes", "safe_build"})
from crslab.model.crs.kbrd.kbrd import KBRDModel
torch.manual_seed(0)
kg = {"edge": [(i, i % 9 + 1, 0) for i in range(1, 10)], "n_relation": 1, "entity": []}
kbrd = KBRDModel(cfg(dict(token_emb_dim=16, kg_emb_dim=16, num_bases=1, n_heads=2, n_layers=1, ffn_size=16,
                          user_proj_dim=16, n_positions=32)), torch.device("cpu"),
                 {"pad": 0, "start": 1, "end": 2, "vocab_size": 20, "n_entity": 10}, {"entity_kg": kg})
_, scores = kbrd.recommend({"context_entities": torch.tensor([[1, 2], [5, 0]]), "item": torch.tensor([3, 4])}, "test")
out["kbrd_user"] = torch.equal(scores[0], scores[1])

# pretrained_path is ignored: BERT goes to PRETRAIN_PATH/bert/en (here a user's folder: refused)
bert_dir = Path(layout.pretrain) / "bert" / "en"; bert_dir.mkdir(parents=True); (bert_dir / "x").write_text("")
from crslab.model.recommendation.bert.bert import BERTModel
out["pretrained_path"] = error(lambda: BERTModel(cfg({"pretrained_path": {"bert": str(root)}}),
                                                 torch.device("cpu"), {"n_entity": 10}, {}))
print("RESULT " + json.dumps(out))
'''


def test_symptoms_without_patches(tmp_path):
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, paths.ENV_VAR: str(tmp_path / "home"), "CUDA_VISIBLE_DEVICES": "-1"}
    env.pop(compat.SKIP_ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", SYMPTOMS_SCRIPT, str(tmp_path)], cwd=tmp_path / "cwd",
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])

    assert "cannot import name 'AdamW'" in out["adamw"]
    assert out["fasttext"] == "installed" or "No module named 'fasttext'" in out["fasttext"]
    assert "leaf Variable that requires grad" in out["position_codes"]
    assert out["plateau"].startswith("TypeError") and "positional argument" in out["plateau"]
    assert out["as_number"].startswith("AssertionError")
    assert out["backward"] == pytest.approx(6 * 3)  # scaled by the loss value 6
    assert out["tensorboard_dir"] == ["runs"]  # written into the current directory
    assert out["nltk_offline"] == [["punkt"]]  # a download attempted on each message
    if out["conv2d_bug_here"]:
        assert not out["textcnn_conv1d"] <= 1e-3  # wrong, inf or NaN
    assert "'DynamicCache' object is not subscriptable" in out["gpt2_cache"]
    assert out["embedding_metrics"] is not None  # the evaluator cannot be built
    assert out["fasttext"] == "installed" or "fasttext is not installed" in out["embedding_metrics"]
    assert "multiple values for argument 'tensorboard'" in out["conv_evaluator"]
    assert out["safe_build"] == []  # the user's notes.txt was deleted
    assert out["kbrd_user"] is True  # identical scores for different users
    assert "UserError" in out["pretrained_path"] and "bert" in out["pretrained_path"]


# ---- the entry point ---------------------------------------------------------------------------

def test_apply_is_idempotent_and_reports_unknown_names(monkeypatch):
    from crslab.model.crs.kbrd.kbrd import KBRDModel
    from crslab.system.base import BaseSystem

    before = (crslab.download.build, BaseSystem.__dict__["backward"], KBRDModel.__dict__["encode_user"])
    compat.apply()
    compat.apply(skip=["backward"])
    assert (crslab.download.build, BaseSystem.__dict__["backward"], KBRDModel.__dict__["encode_user"]) == before
    assert compat.applied() == set(compat.PATCH_NAMES)
    with pytest.raises(ValueError, match="known: fasttext, adamw"):
        compat.apply(skip=["no_such_patch"])
    monkeypatch.setenv(compat.SKIP_ENV_VAR, "backward, plateau")
    assert compat._skipped(["kbrd_user"]) == {"backward", "plateau", "kbrd_user"}


# ---- each patch, applied -----------------------------------------------------------------------

def test_adamw_has_the_old_transformers_defaults():
    from crslab.system.base import optim_class

    opt = optim_class["AdamW"]([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["eps"] == 1e-6


def test_position_codes_same_values_and_fixed():
    import crslab.model.utils.modules.transformer as transformer_module

    kgsf_modules = sys.modules["crslab.model.crs.kgsf.modules"]
    assert kgsf_modules.create_position_codes is transformer_module.create_position_codes
    expected = torch.zeros(50, 16)
    ORIGINALS["position_codes"](50, 16, expected)  # CRSLab's own code, on a plain tensor
    weight = torch.nn.Embedding(50, 16).weight
    transformer_module.create_position_codes(50, 16, weight)
    assert torch.equal(weight, expected) and not weight.requires_grad
    encoder = transformer_module.TransformerEncoder(2, 1, 16, 16, 30, torch.nn.Embedding(30, 16), n_positions=50)
    assert torch.equal(encoder.position_embeddings.weight, expected)


def test_reduce_lr_on_plateau_halves_lr():
    from crslab.system.base import lr_scheduler_class

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler_class["ReduceLROnPlateau"](optimizer, patience=0, factor=0.5, verbose=True)
    scheduler.valid_step(1.0)
    scheduler.valid_step(2.0)  # worse ('min' mode): decay
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_metrics_accept_numpy_scalars():
    from crslab.evaluator.metrics.base import AverageMetric
    from crslab.evaluator.metrics.gen import GreedyMatch

    assert AverageMetric(np.float32(0.25), np.int64(1)).value() == 0.25
    same = [np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)]
    assert GreedyMatch.compute(same, [same]).value() == pytest.approx(1.0)


def test_backward_gives_the_true_gradient_with_accumulation():
    from crslab.evaluator.rec import RecEvaluator
    from crslab.system.base import BaseSystem

    class Bare(BaseSystem):
        fit = step = interact = lambda *a: None

    system = object.__new__(Bare)  # the update logic only, without models and data
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    system.update_freq, system._number_grad_accum, system.gradient_clip, system.parameters = 1, 0, -1, [w]
    system.optimizer = torch.optim.SGD([w], lr=0.0)
    system.evaluator = RecEvaluator()
    loss = (w ** 2).sum()
    system.backward(loss)
    assert torch.equal(w.grad, torch.tensor([4.0, -2.0]))  # d/dw sum(w^2) = 2w, not 5 * 2w
    assert loss.item() == 5.0

    system.update_freq = 2  # two calls, one step, mean gradient
    system.optimizer = torch.optim.SGD([w], lr=1.0)
    system.backward((3 * w).sum())
    assert torch.equal(w.data, torch.tensor([2.0, -1.0]))  # no step yet
    system.backward((5 * w).sum())
    assert torch.equal(w.data, torch.tensor([2.0 - 4.0, -1.0 - 4.0]))  # (3 + 5) / 2


def test_tensorboard_runs_go_under_the_output_root(root, tmp_path, monkeypatch):
    from crslab.evaluator.rec import RecEvaluator

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    evaluator = RecEvaluator(tensorboard=True)
    evaluator.writer.close()
    assert Path(evaluator.writer.log_dir).parent == root.runs
    assert any(Path(evaluator.writer.log_dir).iterdir())
    assert list(cwd.iterdir()) == []


def test_nltk_tokenize_offline_without_download(monkeypatch):
    import nltk
    from crslab.system.base import BaseSystem

    def no_download(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} attempted")

    monkeypatch.setattr(nltk, "download", no_download)
    tokens = BaseSystem.nltk_tokenize(None, "I like it. You'd love Alien (1979)!")
    assert tokens == ["I", "like", "it", ".", "You", "'d", "love", "Alien", "(", "1979", ")", "!"]


def test_textcnn_gradient_is_right(root):
    import torch.nn.functional as F
    from crslab.model.recommendation.textcnn.textcnn import TextCNNModel

    torch.manual_seed(0)
    model = TextCNNModel(config(dict(num_filters=4, embed=16, filter_sizes="(2, 3)", dropout=0.0)),
                         torch.device("cpu"), {"n_entity": 40}, {})
    x = torch.randn(4, 1, 32, 16)
    for conv in model.convs:
        model.conv_and_pool(x, conv).sum().backward()
        w64 = conv.weight.detach().double().requires_grad_(True)
        h = F.relu(F.conv2d(x.double(), w64, conv.bias.detach().double())).squeeze(3)
        F.max_pool1d(h, h.size(2)).sum().backward()
        assert torch.allclose(conv.weight.grad.double(), w64.grad, atol=1e-4)


def test_kbrd_users_with_different_entities_get_different_scores():
    from crslab.model.crs.kbrd.kbrd import KBRDModel

    torch.manual_seed(0)
    kg = {"edge": [(i, i % 9 + 1, 0) for i in range(1, 10)], "n_relation": 1, "entity": []}
    model = KBRDModel(config(dict(token_emb_dim=16, kg_emb_dim=16, num_bases=1, n_heads=2, n_layers=1,
                                  ffn_size=16, user_proj_dim=16, n_positions=32)), torch.device("cpu"),
                      {"pad": 0, "start": 1, "end": 2, "vocab_size": 20, "n_entity": 10}, {"entity_kg": kg})
    entities = torch.tensor([[1, 2, 3], [5, 0, 0], [0, 0, 0]])  # padded as KBRDSystem.step pads
    _, scores = model.recommend({"context_entities": entities, "item": torch.tensor([3, 4, 5])}, "test")
    assert not torch.allclose(scores[0], scores[1])
    kg_embedding = model.kg_encoder(None, model.edge_idx, model.edge_type)
    users = model.encode_user(entities, kg_embedding)
    assert torch.allclose(users[0], model.kg_attn(kg_embedding[[1, 2, 3]]), atol=1e-6)  # padding left out
    assert torch.allclose(users[1], kg_embedding[5], atol=1e-6)
    assert torch.equal(users[2], torch.zeros(16))
    assert torch.allclose(model.encode_user([[1, 2, 3], [5], []], kg_embedding), users)


def test_inspired_conv_runs_with_cache_objects(root, tiny_pretrained):
    from crslab.model.crs.inspired.inspired_conv import InspiredConvModel

    torch.manual_seed(0)
    model = InspiredConvModel(config({"context_truncate": 8, "response_truncate": 6, "conv": {},
                                      "pretrained_path": tiny_pretrained}), torch.device("cpu"), {"pad": 0}, {})
    batch = (torch.tensor([0, 1]), torch.randint(1, 30, (2, 14)), torch.randint(1, 30, (2, 8)), None)
    loss, pred = model.converse(batch, "train")
    assert math.isfinite(loss.item()) and pred.shape == (2, 6)
    loss.backward()
    assert model.model_rm.transformer.wte.weight.grad is not None
    with torch.no_grad():
        generated = model.converse(batch, "test")
    assert generated.shape == (2, 5)


# ---- fastText optional -----------------------------------------------------------------------

def test_conv_and_standard_evaluators_without_fasttext(root, monkeypatch, loguru_messages):
    from crslab.evaluator import get_evaluator

    if fasttext_available():
        pytest.skip("fasttext is installed here")
    monkeypatch.setattr(compat_evaluators, "_embedding_warned", False)
    for name in ("standard", "conv", "standard"):
        evaluator = get_evaluator(name, "ReDial")
        evaluator.gen_evaluate("you should watch it", ["you should see it", "watch it"])
        report = evaluator.gen_metrics.report()
        assert {"f1", "bleu@1", "bleu@4"} <= set(report) and report["f1"].value() > 0
        assert not {"greedy", "average", "extreme"} & set(report)
        evaluator.report()
    warnings = [m for m in loguru_messages if "embedding metrics" in m]
    assert len(warnings) == 1 and "fasttext" in warnings[0]
    assert not Path(root.embedding).exists()  # nothing downloaded


def test_evaluator_when_the_vectors_cannot_be_downloaded(root, monkeypatch, loguru_messages):
    import crslab.evaluator.embeddings as embeddings
    from crslab.evaluator import get_evaluator

    if not fasttext_available():  # stand in for the package: it is never reached
        monkeypatch.setitem(sys.modules, "fasttext", types.ModuleType("fasttext"))
    dead = crslab.download.DownloadableFile(DEAD_URL, "cc.en.300.zip", "0" * 64)
    monkeypatch.setitem(embeddings.resources, "en", {"version": "0.2", "file": dead})
    monkeypatch.setattr(compat_evaluators, "_embedding_warned", False)
    evaluator = get_evaluator("conv", "ReDial")
    assert evaluator.ft is None
    evaluator.gen_evaluate("watch it", ["watch it"])
    assert "greedy" not in evaluator.gen_metrics.report()
    warnings = [m for m in loguru_messages if "embedding metrics" in m]
    assert len(warnings) == 1 and "cc.en.300.bin" in warnings[0] and DEAD_URL in warnings[0]
    assert not (Path(root.embedding) / "en").exists()
    assert [p.name for p in Path(root.embedding).iterdir()] == []  # no half-made folder left


# ---- safe build --------------------------------------------------------------------------------

def _archive(folder: Path, name: str = "data.zip") -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train_data.json", "[]")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("marker", [None, "another version", "dataset.json"])
def test_build_never_deletes_a_user_folder(tmp_path, marker):
    from crslab.data.dataset import base as dataset_base

    assert dataset_base.build is crslab.download.build is safe_build
    folder = tmp_path / "redial" / "nltk"
    folder.mkdir(parents=True)
    (folder / "train_data.json").write_text("[1]")
    if marker == "another version":
        (folder / ".built").write_text("2021-01-01\n0.2")
    elif marker == "dataset.json":
        (folder / "dataset.json").write_text("{}")
    before = sorted(p.name for p in folder.iterdir())
    dfile = crslab.download.DownloadableFile(DEAD_URL, "redial_nltk.zip", "0" * 64)
    with pytest.raises(UserError) as err:
        dataset_base.build(str(folder), dfile, version="0.31")
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert "lotcrs_plugin" in message if marker == "dataset.json" else "not CRSLab's download" in message
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "train_data.json").read_text() == "[1]"


def test_build_uses_crslab_downloads_and_registered_folders_as_they_are(tmp_path):
    dfile = crslab.download.DownloadableFile(DEAD_URL, "x.zip", "0" * 64)
    done = tmp_path / "done"
    done.mkdir()
    (done / ".built").write_text("2021-01-01\n0.31")
    crslab.download.build(str(done), dfile, "0.31")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_text("w")
    register_local_resource(mine)
    crslab.download.build(str(mine), dfile, "0.1")
    assert sorted(p.name for p in mine.iterdir()) == ["weights.bin"]


def test_failed_download_names_url_and_place(tmp_path):
    folder = tmp_path / "pretrain" / "gpt2" / "en"
    dfile = crslab.download.DownloadableFile(DEAD_URL, "gpt2_en.zip", "0" * 64)
    with pytest.raises(UserError) as err:
        crslab.download.build(str(folder), dfile, "0.1")
    message = str(err.value)
    assert "\n" not in message and DEAD_URL in message and str(folder / "gpt2_en.zip") in message
    assert not folder.exists() and list(folder.parent.iterdir()) == []


def test_download_and_user_placed_archive_are_installed(tmp_path):
    served = tmp_path / "served"
    archive, sha = _archive(served)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        folder = tmp_path / "data" / "redial"
        crslab.download.build(str(folder), crslab.download.DownloadableFile(url, "data.zip", sha), "0.31")
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in folder.iterdir()) == [".built", "train_data.json"]
    assert crslab.download.check_build(str(folder), "0.31")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["redial"]  # no staging folder left

    placed = tmp_path / "placed"
    placed.mkdir()
    placed.joinpath("data.zip").write_bytes(archive.read_bytes())
    crslab.download.build(str(placed), crslab.download.DownloadableFile(DEAD_URL, "data.zip", sha), "0.31")
    assert sorted(p.name for p in placed.iterdir()) == [".built", "data.zip", "train_data.json"]
    wrong = crslab.download.DownloadableFile(DEAD_URL, "data.zip", "1" * 64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.zip").write_bytes(archive.read_bytes())
    with pytest.raises(UserError, match="SHA-256"):
        crslab.download.build(str(tmp_path / "bad"), wrong, "0.31")


# ---- local pretrained models -------------------------------------------------------------------

def test_pretrained_path_loads_a_local_bert(root, tiny_pretrained):
    from crslab.model.recommendation.bert.bert import BERTModel
    from transformers import BertModel

    cfg = config({"pretrained_path": {"bert": tiny_pretrained["bert"]}})
    model = BERTModel(cfg, torch.device("cpu"), {"n_entity": N_ITEMS + 1}, {})
    saved = BertModel.from_pretrained(tiny_pretrained["bert"])
    assert model.bert.config.hidden_size == 32 and model.bert.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(model.bert.state_dict().values(), saved.state_dict().values()))
    assert model.dpath == str(Path(tiny_pretrained["bert"]).resolve())
    assert not Path(root.pretrain).exists()  # build() did nothing
    assert sorted(p.name for p in Path(tiny_pretrained["bert"]).iterdir()) == ["config.json", "model.safetensors"]

    with pytest.raises(UserError, match="unknown key.*bart.*known: bert, gpt2"):
        BERTModel(config({"pretrained_path": {"bart": "x"}}), torch.device("cpu"), {"n_entity": 3}, {})
    with pytest.raises(UserError, match="no config.json"):
        BERTModel(config({"pretrained_path": {"bert": str(root.root)}}), torch.device("cpu"), {"n_entity": 3}, {})


# ---- CRSLab's recommenders through their systems ---------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_recommender_trains_and_evaluates_through_its_system(name, root, tiny_pretrained, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # crslab's Config sets it; TGReDialSystem reads it
    if name == "KGSF":  # KGSF's copy mask, which CRSLab downloads per dataset
        masks = Path(root.model) / "kgsf" / "ReDial"
        masks.mkdir(parents=True)
        np.save(masks / "copy_mask.npy", np.ones(len(WORDS) + 4, dtype=bool))
        register_local_resource(masks)
    torch.manual_seed(0)
    random.seed(0)
    system = build_system(name, tiny_pretrained)
    if name == "KGSF":
        system.pretrain()
    system.train_recommender()  # one epoch: train, valid, test
    rec = system.evaluator.rec_metrics.report()
    assert {"hit@1", "hit@10", "hit@50", "ndcg@50", "mrr@50"} <= set(rec)
    hit = [rec[f"hit@{k}"].value() for k in (1, 10, 50)]
    assert 0.0 <= hit[0] <= hit[1] <= hit[2] <= 1.0  # a deeper list holds every shallower one's hits
    # per sample, 1/rank <= 1/log2(rank + 1) <= 1 for a hit: MRR <= NDCG <= hit rate
    assert rec["mrr@50"].value() <= rec["ndcg@50"].value() + 1e-9 <= hit[2] + 2e-9
    assert math.isfinite(system.evaluator.optim_metrics["rec_loss"])
    if hasattr(system, "conv_model") or name in ("KBRD", "KGSF"):
        system.train_conversation()
        gen = system.evaluator.gen_metrics.report()
        assert {"f1", "bleu@1", "dist@1"} <= set(gen)
    assert not Path(root.pretrain).exists()  # the tiny models came from pretrained_path


# ---- patches added after the first round ---------------------------------------------------

def _synthetic_dataset(n_items: int = 60):
    import lotcrs_plugin
    from lotcrs_plugin import paths

    lotcrs_plugin.register()
    paths.apply_to_crslab()
    from crslab.data import get_dataset

    opt = {"dataset": "synthetic", "tokenize": "nltk",
           "synthetic": {"n_items": n_items, "n_conversations": 120, "seed": 2}}
    return opt, get_dataset(opt, "nltk", False, False)


def test_textcnn_token_table_covers_the_vocabulary():
    """Unpatched, TextCNN embeds tokens with an n_entity-row table: token ids past it crash."""
    import torch

    opt, ds = _synthetic_dataset()
    from crslab.model import get_model

    vocab = dict(ds.vocab, vocab_size=ds.vocab["n_entity"] + 500)  # a larger (BERT-like) vocabulary
    from lotcrs_plugin.config import to_crslab_config

    config = to_crslab_config({**opt, "rec_model": "TextCNN", "num_filters": 4, "embed": 8,
                               "filter_sizes": "(2, 3)", "dropout": 0.0})
    model = get_model(config, "TextCNN", torch.device("cpu"), vocab, ds.side_data)
    assert model.embedding.num_embeddings == vocab["vocab_size"]
    assert model.fc.out_features == vocab["n_entity"]  # scores stay over entities
    context = torch.full((2, 6), vocab["vocab_size"] - 1)
    batch = (context, None, None, None, None, None, torch.tensor([1, 2]))
    loss, scores = model(batch, "train")
    assert scores.shape == (2, vocab["n_entity"]) and torch.isfinite(loss)


def test_kgsf_builds_on_a_plugin_dataset_without_download():
    import numpy as np
    import torch

    from lotcrs_plugin import paths

    opt, ds = _synthetic_dataset()
    from crslab.model import get_model

    from lotcrs_plugin.config import to_crslab_config

    config = to_crslab_config({**opt, "model": "KGSF", "token_emb_dim": 16, "kg_emb_dim": 16,
                               "num_bases": 2, "n_heads": 2, "n_layers": 1, "ffn_size": 16,
                               "n_positions": 128, "dropout": 0.1, "attention_dropout": 0.0,
                               "relu_dropout": 0.1, "embeddings_scale": True, "reduction": False,
                               "learn_positional_embeddings": False, "response_truncate": 20})
    model = get_model(config, "KGSF", torch.device("cpu"), ds.vocab, ds.side_data)
    folder = paths.active_layout().model / "kgsf" / "synthetic"
    mask = np.load(folder / "copy_mask.npy")
    assert mask.shape == (ds.vocab["vocab_size"],)
    assert mask.any() and not mask[: 4].any()  # concept words copyable, special tokens never
    assert np.array_equal(mask, kgsf_copy_mask(ds.vocab))
    assert model.copy_mask.shape[0] == ds.vocab["vocab_size"]
    assert "synthetic" not in sys.modules["crslab.model.crs.kgsf.resources"].resources
