"""The patches of CRSLab's models: position codes, GPT-2's key/value cache, KBRD's user
representation, TextCNN's convolution and token table, and KGSF's copy mask."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lotcrs_plugin.compat.rebind import ORIGINALS, _is_patched, _mark, _module, _patch_method, _replace_everywhere
from lotcrs_plugin.compat.resources import register_local_resource

if TYPE_CHECKING:
    import numpy as np
    import torch


# ---- sinusoidal position codes ---------------------------------------------------------------

def create_position_codes(n_pos: int, dim: int, out: "torch.Tensor") -> None:
    """CRSLab's create_position_codes, filled under no_grad (same values, vectorised)."""
    import numpy as np
    import torch

    pos = np.arange(n_pos)[:, None]
    j = np.arange(dim // 2)[None, :]
    position_enc = pos / np.power(10000, 2 * j / dim)
    with torch.no_grad():
        out[:, 0::2] = torch.tensor(np.sin(position_enc)).type_as(out)
        out[:, 1::2] = torch.tensor(np.cos(position_enc)).type_as(out)
    out.detach_()
    out.requires_grad = False


def _patch_position_codes() -> None:
    """Symptom (KBRD, KGSF, Transformer): `a view of a leaf Variable that requires grad is being
    used in an in-place operation` in create_position_codes, which writes into an nn.Embedding
    weight. The replacement writes the same values under torch.no_grad(); it is bound in
    crslab.model.utils.modules.transformer and in every module that imported it (the KGSF
    modules)."""
    module = _module("crslab.model.utils.modules.transformer")
    _import_kgsf_modules()
    original = module.create_position_codes
    if _is_patched(original):
        return
    ORIGINALS["position_codes"] = original
    _replace_everywhere(original, _mark(create_position_codes, "position_codes"))


def _import_kgsf_modules() -> None:
    importlib.import_module("crslab.model.crs.kgsf")  # loads crslab.model.crs.kgsf.modules


# ---- InspiredConv with transformers' Cache objects -------------------------------------------

_CACHE_KW: dict[type, bool] = {}


def _takes_cache_kw(model: Any) -> bool:
    """transformers >= 5 names the key/value cache argument `cache`; before, `past_key_values`."""
    cls = type(model)
    if cls not in _CACHE_KW:
        _CACHE_KW[cls] = "cache" in inspect.signature(cls.forward).parameters
    return _CACHE_KW[cls]


def gpt2_step(model: Any, input_ids: "torch.Tensor", past: Any) -> tuple["torch.Tensor", Any]:
    """One causal-LM call continuing from ``past``; returns (logits, new cache)."""
    if _takes_cache_kw(model):
        outputs = model(input_ids, cache=past)
        return outputs.logits, outputs.cache
    outputs = model(input_ids, past_key_values=past)
    return outputs.logits, outputs.past_key_values


def cache_length(past: Any) -> int:
    """Number of cached positions: a Cache object, a legacy tuple of (key, value) per layer, or
    the older tuple of stacked tensors (2, batch, heads, seq, head_dim) that CRSLab indexed."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    first = past[0]
    if hasattr(first, "shape"):
        return int(first.shape[3])
    return int(first[0].shape[-2])


def _patch_gpt2_cache() -> None:
    """Symptom: `'DynamicCache' object is not subscriptable` in InspiredConvModel.converse
    (``past[0].shape[3]``) with transformers 5, whose GPT-2 returns a Cache object. converse
    and generate are replaced by copies that measure the cache with get_seq_length() and pass
    it by the keyword this transformers uses; the position limit is the model's n_positions
    (1024 for GPT-2, as CRSLab hard-coded). TGConv's and GPT2's greedy generate read
    ``outputs.past_key_values``, deprecated in transformers 5 (removed in 5.40): they get the
    same treatment."""
    import torch

    cls = _module("crslab.model.crs.inspired.inspired_conv").InspiredConvModel

    def make_converse(original: Callable) -> Callable:
        def converse(self, batch, mode):
            roles, input_ids, context, _ = batch
            input_ids_iters = input_ids.unsqueeze(1)
            past = None
            lm_logits_all = []
            if mode != "test":
                limit = getattr(self.model_sk.config, "n_positions", 1024)
                for turn, ids in enumerate(input_ids_iters):
                    model = self.model_sk if roles[turn] == 0 else self.model_rm
                    # GPT-2 attends to at most n_positions tokens: start afresh beyond that
                    if past is not None and cache_length(past) + ids.shape[1] > limit:
                        past = None
                    lm_logits, past = gpt2_step(model, ids, past)
                    lm_logits_all.append(lm_logits)
                lm_logits_all = torch.cat(lm_logits_all, dim=0)  # (bs, seq_len, vocab)
                loss = self.calculate_loss(lm_logits_all[:, -self.response_truncate:-1, :],
                                           input_ids[:, -self.response_truncate + 1:])
                pred = torch.max(lm_logits_all, dim=2)[1]
                pred = pred[:, -self.response_truncate:]
                return loss, pred
            return self.generate(roles, context)
        return converse

    def make_generate(original: Callable) -> Callable:
        def generate(self, roles, context):
            generated_response = []
            former_hidden_state = None
            context = context[..., -self.response_truncate + 1:]
            for _ in range(self.response_truncate - 1):
                last_hidden_state_all = []
                for turn, ids in enumerate(context.unsqueeze(1)):
                    model = self.model_sk if roles[turn] == 0 else self.model_rm
                    last_hidden_state, former_hidden_state = gpt2_step(model, ids, former_hidden_state)
                    last_hidden_state_all.append(last_hidden_state)
                last_hidden_state_all = torch.cat(last_hidden_state_all, dim=0)
                preds = last_hidden_state_all[:, -1, :].argmax(dim=-1).long()  # (bs)
                context = preds.unsqueeze(1)
                generated_response.append(preds)
            return torch.stack(generated_response).T
        return generate

    def make_lm_generate(original: Callable) -> Callable:
        def generate(self, context):
            generated_response = []
            former_hidden_state = None
            context = context[..., -self.response_truncate + 1:]
            for _ in range(self.response_truncate - 1):
                last_hidden_state, former_hidden_state = gpt2_step(self.model, context, former_hidden_state)
                preds = last_hidden_state[:, -1, :].argmax(dim=-1).long()  # (bs)
                context = preds.unsqueeze(1)
                generated_response.append(preds)
            return torch.stack(generated_response).T
        return generate

    _patch_method(cls, "converse", make_converse, "gpt2_cache")
    _patch_method(cls, "generate", make_generate, "gpt2_cache")
    for module_name, class_name in (("crslab.model.crs.tgredial.tg_conv", "TGConvModel"),
                                    ("crslab.model.conversation.gpt2.gpt2", "GPT2Model")):
        _patch_method(getattr(_module(module_name), class_name), "generate", make_lm_generate, "gpt2_cache")


# ---- KBRD user representation ----------------------------------------------------------------

def _patch_kbrd_user() -> None:
    """Symptom: KBRD gives every user the same scores. KBRDModel.encode_user in 0.1.2 returns a
    zero vector when entities ARE given (`if entity_list is not None`), so scores are the bias
    alone. The replacement attends over each user's entities (SelfAttentionBatch's formula,
    vectorised over the batch; padding id 0, which KBRDSystem.step pads with, is masked) and
    returns zeros only for users without entities."""
    import torch

    cls = _module("crslab.model.crs.kbrd.kbrd").KBRDModel
    padded_tensor = _module("crslab.data.dataloader.utils").padded_tensor

    def make(original: Callable) -> Callable:
        def encode_user(self, entity_lists, kg_embedding):
            if not torch.is_tensor(entity_lists):
                entity_lists = padded_tensor([list(e) if e is not None else [] for e in entity_lists],
                                             pad_idx=0)
            ids = entity_lists.to(kg_embedding.device).long()
            mask = ids != 0  # (bs, n)
            h = kg_embedding[ids]  # (bs, n, dim)
            e = torch.matmul(torch.tanh(torch.matmul(h, self.kg_attn.a)), self.kg_attn.b).squeeze(-1)
            has_entity = mask.any(dim=1, keepdim=True)
            e = e.masked_fill(~mask & has_entity, float("-inf")).masked_fill(~has_entity, 0.0)
            weights = torch.softmax(e, dim=1) * mask  # rows without entities: all zero
            return torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # (bs, dim)
        return encode_user

    _patch_method(cls, "encode_user", make, "kbrd_user")


# ---- TextCNN convolution ---------------------------------------------------------------------

def _patch_textcnn_conv1d() -> None:
    """Symptom: TextCNN trains to huge or NaN losses (grad norm up to 1e31) on torch 2.13 CPU:
    oneDNN computes a wrong weight gradient for a Conv2d whose kernel spans the whole input
    width when that width is 14..19 (TextCNN's Conv2d(1, F, (k, embed)) with embed 16, say).
    TextCNNModel.conv_and_pool computes the same convolution as a Conv1d over the sequence
    with the same nn.Conv2d parameters (weight (F, 1, k, E) viewed as (F, E, k)), so the
    state_dict is unchanged."""
    import torch.nn.functional as F

    cls = _module("crslab.model.recommendation.textcnn.textcnn").TextCNNModel

    def make(original: Callable) -> Callable:
        def conv_and_pool(self, x, conv):
            spans_width = (conv.in_channels == 1 and conv.groups == 1 and x.dim() == 4
                           and conv.kernel_size[1] == x.size(3) and conv.stride == (1, 1)
                           and conv.dilation == (1, 1) and conv.padding == (0, 0))
            if not spans_width:
                return original(self, x, conv)
            weight = conv.weight.squeeze(1).transpose(1, 2)  # (F, E, k)
            h = F.relu(F.conv1d(x.squeeze(1).transpose(1, 2), weight, conv.bias))  # (bs, F, L-k+1)
            return F.max_pool1d(h, h.size(2)).squeeze(2)
        return conv_and_pool

    _patch_method(cls, "conv_and_pool", make, "textcnn_conv1d")


# ---- TextCNN token table ---------------------------------------------------------------------

def _patch_textcnn_vocab() -> None:
    """Symptom: `IndexError: index out of range in self` in TextCNN's embedding. CRSLab sizes
    the table that embeds context TOKENS by the number of ENTITIES; on ReDial the entities
    outnumber the tokens, so it went unnoticed, but a small catalog or a BERT/GPT-2 vocabulary
    overflows it. The table gets max(n_entity, vocab_size) rows (the output layer keeps
    n_entity); with entities outnumbering tokens nothing changes, so saved models still load."""
    from torch import nn

    cls = _module("crslab.model.recommendation.textcnn.textcnn").TextCNNModel

    def make_init(original: Callable) -> Callable:
        def __init__(self, opt, device, vocab, side_data):
            # read by build_model, which the original __init__ calls
            object.__setattr__(self, "_lotcrs_vocab_size", int(vocab.get("vocab_size", 0)))
            original(self, opt, device, vocab, side_data)
        return __init__

    def make_build(original: Callable) -> Callable:
        def build_model(self):
            original(self)
            rows = max(self.movie_num, getattr(self, "_lotcrs_vocab_size", 0))
            if rows > self.embedding.num_embeddings:
                self.embedding = nn.Embedding(rows, self.embed)
        return build_model

    _patch_method(cls, "__init__", make_init, "textcnn_vocab")
    _patch_method(cls, "build_model", make_build, "textcnn_vocab")


# ---- KGSF copy mask for datasets CRSLab does not know ----------------------------------------

def kgsf_copy_mask(vocab: dict) -> "np.ndarray":
    """Which tokens KGSF's decoder may copy: those that are concept words (word2id) or entity
    names of one token, never special tokens; CRSLab ships this mask per dataset instead."""
    import numpy as np

    tok2ind = vocab["tok2ind"]
    copyable = set(vocab.get("word2id", {})) | {e for e in vocab.get("entity2id", {}) if " " not in e}
    mask = np.zeros(len(tok2ind) if tok2ind else 0, dtype=bool)
    ids = [i for tok, i in tok2ind.items() if tok in copyable and not tok.startswith("__")]
    if ids:
        mask[np.asarray(ids)] = True
    return mask


def _patch_kgsf_copy_mask() -> None:
    """Symptom: `KeyError: '<dataset>'` building KGSF on any dataset CRSLab does not list (the
    plugin's synthetic and imported ones): KGSF downloads a per-dataset copy_mask.npy. For
    such a dataset the mask is derived from the vocabulary (:func:`kgsf_copy_mask`) and
    written (atomically, every time: it is derived data and the vocabulary may change) to the
    folder KGSF reads, MODEL_PATH/kgsf/<dataset>, which is then used as a local resource, so
    nothing is downloaded. The resources table is left as it was."""
    import numpy as np

    kgsf = _module("crslab.model.crs.kgsf.kgsf")
    resources = _module("crslab.model.crs.kgsf.resources").resources
    cls = kgsf.KGSFModel

    def make(original: Callable) -> Callable:
        def __init__(self, opt, device, vocab, side_data):
            dataset = opt["dataset"]
            if dataset in resources:
                return original(self, opt, device, vocab, side_data)
            folder = Path(kgsf.MODEL_PATH) / "kgsf" / dataset
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".copy_mask.{os.getpid()}.npy"
            np.save(tmp, kgsf_copy_mask(vocab))
            os.replace(tmp, folder / "copy_mask.npy")
            register_local_resource(folder)
            resources[dataset] = {"version": "local", "file": None}
            try:
                original(self, opt, device, vocab, side_data)
            finally:
                resources.pop(dataset, None)
        return __init__

    _patch_method(cls, "__init__", make, "kgsf_copy_mask")
