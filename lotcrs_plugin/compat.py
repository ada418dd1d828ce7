"""Make crslab 0.1.2 work on Python 3.11/3.12, torch >= 2.1 and transformers 5.x.

No CRSLab file is edited: each patch replaces one attribute (a function, a method, a name a
module imported) in a loaded crslab module. Every patch is idempotent (applying twice changes
nothing) and its docstring names the symptom it cures. :func:`apply` imports crslab's data,
model, system and evaluator packages in the order the patches need, then applies the patches
of :data:`PATCH_NAMES` that are not skipped (argument ``skip`` or the environment variable
``LOTCRS_COMPAT_SKIP=name1,name2``; tests use it to show each symptom).

A CRSLab module that did ``from x import f`` holds its own reference to ``f``: function
patches are applied to every loaded crslab module that still holds the original
(:func:`_replace_everywhere`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lotcrs_plugin.errors import UserError

if TYPE_CHECKING:
    import torch

SKIP_ENV_VAR = "LOTCRS_COMPAT_SKIP"

# Patches needed to import crslab at all; applied during the imports.
IMPORT_PATCHES = ("fasttext", "adamw")
# Patches applied once crslab is imported, in this order.
POST_IMPORT_PATCHES = (
    "position_codes",
    "plateau",
    "as_number",
    "gpt2_cache",
    "kbrd_user",
    "embedding_metrics",
    "conv_evaluator",
    "backward",
    "tensorboard_dir",
    "nltk_offline",
    "safe_build",
    "pretrained_path",
    "textcnn_conv1d",
    "textcnn_vocab",
    "kgsf_copy_mask",
)
PATCH_NAMES: tuple[str, ...] = IMPORT_PATCHES + POST_IMPORT_PATCHES

_applied: set[str] = set()
_MARK = "__lotcrs_patch__"
# name -> the crslab function a function patch replaced (for tests and debugging)
ORIGINALS: dict[str, Callable] = {}


# ---- helpers ---------------------------------------------------------------------------------

def _mark(func: Callable, name: str) -> Callable:
    setattr(func, _MARK, name)
    return func


def _is_patched(obj: Any) -> bool:
    return getattr(obj, _MARK, None) is not None


def _crslab_modules() -> list[types.ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "crslab" or n.startswith("crslab."))]


def _replace_everywhere(original: Any, replacement: Any) -> list[str]:
    """Bind every crslab module attribute that is ``original`` to ``replacement``."""
    hits = []
    for module in _crslab_modules():
        for key, value in list(vars(module).items()):
            if value is original:
                setattr(module, key, replacement)
                hits.append(f"{module.__name__}.{key}")
    return hits


def _module(name: str) -> types.ModuleType:
    """A crslab module by name; some (crslab.model.crs.kgsf.modules) are shadowed by a class or
    function of the same name in their package, so they are read from sys.modules."""
    if name in sys.modules:
        return sys.modules[name]
    return importlib.import_module(name)


def _patch_method(cls: type, attr: str, make: Callable[[Callable], Callable], name: str) -> None:
    """Replace ``cls.attr`` by ``make(original)`` unless already patched (idempotent)."""
    current = cls.__dict__[attr]
    func = current.__func__ if isinstance(current, (classmethod, staticmethod)) else current
    if _is_patched(func):
        return
    new = _mark(make(func), name)
    new.__wrapped_original__ = func
    if isinstance(current, classmethod):
        new = classmethod(new)
    setattr(cls, attr, new)


# ---- 1. transformers.AdamW -------------------------------------------------------------------

def _adamw_class() -> type:
    """transformers.AdamW as CRSLab knew it: torch's AdamW with the old HF defaults."""
    import torch

    class AdamW(torch.optim.AdamW):
        # transformers < 4.x AdamW defaults: no weight decay, eps 1e-6
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                     correct_bias=True, **kwargs):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    AdamW.__module__ = __name__
    return AdamW


def _import_system_with_adamw() -> None:
    """Symptom: `cannot import name 'AdamW' from 'transformers'` when importing crslab.system.

    transformers 5 removed AdamW. crslab.system.base imports it at module load, so it is lent
    to the transformers module for that import only, then taken back. It must be set after
    crslab.model is imported: importing a model module replaces sys.modules['transformers'].
    """
    if "crslab.system.base" in sys.modules:
        return
    importlib.import_module("crslab.model")
    import transformers

    had = "AdamW" in vars(transformers)
    if not had:
        transformers.AdamW = _adamw_class()
    try:
        importlib.import_module("crslab.system")
    finally:
        if not had:
            try:
                delattr(transformers, "AdamW")
            except AttributeError:
                pass


# ---- 7a. fasttext optional at import ---------------------------------------------------------

def _fasttext_optional() -> None:
    """Symptom: `ModuleNotFoundError: No module named 'fasttext'` when importing crslab.evaluator.

    fasttext only serves the embedding metrics of generated text; without it, a stand-in module
    lets crslab import, and the ``embedding_metrics`` patch skips those metrics.
    """
    try:
        import fasttext  # noqa: F401
    except ImportError:
        stub = types.ModuleType("fasttext")
        stub.__lotcrs_stub__ = True

        def load_model(path: str):
            raise ImportError("fasttext is not installed")

        stub.load_model = load_model
        sys.modules["fasttext"] = stub


def fasttext_available() -> bool:
    """Whether a real fasttext module is importable (not the stand-in of :func:`_fasttext_optional`)."""
    try:
        module = importlib.import_module("fasttext")
    except ImportError:
        return False
    return not getattr(module, "__lotcrs_stub__", False)


# ---- 2. sinusoidal position codes ------------------------------------------------------------

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


# ---- 3. ReduceLROnPlateau --------------------------------------------------------------------

def _patch_plateau() -> None:
    """Symptom: `ReduceLROnPlateau.__init__() takes from 2 to 10 positional arguments but 11
    were given`: CRSLab's wrapper passes `verbose` positionally, which torch 2.x removed. The
    wrapper's __init__ is replaced by one passing keywords; `verbose` is accepted and ignored."""
    lr_scheduler = _module("crslab.system.utils.lr_scheduler")
    cls = lr_scheduler.ReduceLROnPlateau

    def make(original: Callable) -> Callable:
        def __init__(self, optimizer, mode="min", factor=0.1, patience=10, verbose=False,
                     threshold=0.0001, threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-08,
                     warmup_steps=0):
            lr_scheduler.LRScheduler.__init__(self, optimizer, warmup_steps)
            self.scheduler = lr_scheduler.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr, eps=eps)
        return __init__

    _patch_method(cls, "__init__", make, "plateau")


# ---- 4. Metric.as_number ---------------------------------------------------------------------

def _patch_as_number() -> None:
    """Symptom: AssertionError in Metric.as_number for numpy scalars (GreedyMatch,
    EmbeddingAverage and VectorExtrema return numpy.float32). numpy scalars are converted with
    .item() like tensors."""
    import numpy as np
    import torch

    base = _module("crslab.evaluator.metrics.base")

    def make(original: Callable) -> Callable:
        def as_number(cls, obj):
            if isinstance(obj, (torch.Tensor, np.generic)):
                obj = obj.item()
            assert isinstance(obj, (int, float)), f"not a number: {obj!r}"
            return obj
        return as_number

    _patch_method(base.Metric, "as_number", make, "as_number")


# ---- 5. InspiredConv with transformers' Cache objects ----------------------------------------

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


# ---- 6. KBRD user representation -------------------------------------------------------------

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


# ---- 7b. embedding metrics optional ----------------------------------------------------------

_embedding_warned = False


def _warn_embedding_once(reason: str) -> None:
    global _embedding_warned
    if _embedding_warned:
        return
    _embedding_warned = True
    from loguru import logger

    logger.warning(f"embedding metrics (greedy, average, extreme) are skipped: {reason}")


def _patch_embedding_metrics() -> None:
    """Symptom: the conv and standard evaluators crash at construction without the fasttext
    package (ImportError) or when the fastText vectors cc.<lang>.300.bin cannot be downloaded
    (no network: CRSLab retries for 15 s, then RuntimeError). Now the evaluator is built
    without embeddings, one warning names why, and gen_evaluate computes every other metric
    (f1, bleu@k, dist@k) while greedy/average/extreme are left out."""
    from nltk import ngrams

    metrics = _module("crslab.evaluator.metrics")
    classes = [_module("crslab.evaluator.standard").StandardEvaluator,
               _module("crslab.evaluator.conv").ConvEvaluator]

    def make_load(original: Callable) -> Callable:
        def _load_embedding(self, language):
            self.ft = None
            if not fasttext_available():
                _warn_embedding_once("the fasttext package is not installed (pip install fasttext)")
                return
            try:
                original(self, language)
            except Exception as exc:  # download refused or failed, unreadable file
                self.ft = None
                _warn_embedding_once(f"cannot load the fastText vectors cc.{language}.300.bin: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return _load_embedding

    def make_gen(original: Callable) -> Callable:
        def gen_evaluate(self, hyp, refs):
            if getattr(self, "ft", None) is not None:
                return original(self, hyp, refs)
            if hyp:  # CRSLab's gen_evaluate without the embedding metrics
                self.gen_metrics.add("f1", metrics.F1Metric.compute(hyp, refs))
                for k in range(1, 5):
                    self.gen_metrics.add(f"bleu@{k}", metrics.BleuMetric.compute(hyp, refs, k))
                    for token in ngrams(hyp, k):
                        self.dist_set[f"dist@{k}"].add(token)
                self.dist_cnt += 1
        return gen_evaluate

    for cls in classes:
        _patch_method(cls, "_load_embedding", make_load, "embedding_metrics")
        _patch_method(cls, "gen_evaluate", make_gen, "embedding_metrics")


def _patch_conv_evaluator() -> None:
    """Symptom: `evaluator: conv` fails: get_evaluator calls ConvEvaluator(language,
    tensorboard=...), but its __init__ takes only tensorboard (`got multiple values for
    argument 'tensorboard'`); it also never loads the embedding that its gen_evaluate reads
    (`no attribute 'ft'`). __init__ now takes (language=None, tensorboard=False) and loads the
    embedding like StandardEvaluator does."""
    cls = _module("crslab.evaluator.conv").ConvEvaluator

    def make(original: Callable) -> Callable:
        def __init__(self, language=None, tensorboard=False):
            original(self, tensorboard=tensorboard)
            self.ft = None
            if language is not None:
                self._load_embedding(language)
        return __init__

    _patch_method(cls, "__init__", make, "conv_evaluator")


# ---- 8. BaseSystem.backward ------------------------------------------------------------------

def _patch_backward() -> None:
    """Symptom: every gradient is multiplied by the loss value: BaseSystem.backward calls
    `loss.backward(loss.clone().detach())`. Replaced by a plain `loss.backward()`, keeping the
    update_freq accumulation (loss divided by update_freq, parameters stepped every
    update_freq calls); the division is out of place, so the loss the caller logs is intact."""
    cls = _module("crslab.system.base").BaseSystem

    def make(original: Callable) -> Callable:
        def backward(self, loss):
            self._zero_grad()
            if self.update_freq > 1:
                self._number_grad_accum = (self._number_grad_accum + 1) % self.update_freq
                loss = loss / self.update_freq
            loss.backward()
            self._update_params()
        return backward

    _patch_method(cls, "backward", make, "backward")


# ---- 9a. tensorboard runs/ into the output root ----------------------------------------------

def _patch_tensorboard_dir() -> None:
    """Symptom: with tensorboard on, the evaluators create ./runs/<time> in the current
    directory (SummaryWriter(log_dir='runs/...')). The name SummaryWriter in the evaluator
    modules is bound to a factory that puts a relative log_dir under
    lotcrs_plugin.paths.active_layout().runs."""
    for name in ("crslab.evaluator.standard", "crslab.evaluator.conv", "crslab.evaluator.rec"):
        module = _module(name)
        original = module.SummaryWriter
        if _is_patched(original):
            continue

        def make(original_cls: type) -> Callable:
            def SummaryWriter(log_dir=None, *args, **kwargs):
                from lotcrs_plugin.paths import active_layout

                if log_dir is not None and not os.path.isabs(str(log_dir)):
                    rel = Path(log_dir)
                    if rel.parts and rel.parts[0] == "runs":
                        rel = Path(*rel.parts[1:])
                    log_dir = str(active_layout().runs / rel)
                return original_cls(log_dir, *args, **kwargs)
            return SummaryWriter

        module.SummaryWriter = _mark(make(original), "tensorboard_dir")


# ---- 9b. nltk tokenization offline -----------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize without downloads: punkt sentence splitting when its data is
    installed, else a split after . ! ? followed by space; then nltk's Treebank-style word
    tokenizer (what word_tokenize applies to each sentence)."""
    import nltk
    from nltk.tokenize import NLTKWordTokenizer

    try:
        return nltk.word_tokenize(text)
    except LookupError:  # punkt / punkt_tab not installed
        tokenizer = NLTKWordTokenizer()
        return [tok for sent in _SENTENCE_END.split(text) if sent for tok in tokenizer.tokenize(sent)]


def _patch_nltk_offline() -> None:
    """Symptom: interactive mode calls nltk.download('punkt') on every message (no network:
    an error printed, then word_tokenize raises LookupError for punkt_tab). BaseSystem's
    nltk_tokenize is replaced by :func:`word_tokenize`, which never downloads."""
    cls = _module("crslab.system.base").BaseSystem

    def make(original: Callable) -> Callable:
        def nltk_tokenize(self, text):
            return word_tokenize(text)
        return nltk_tokenize

    _patch_method(cls, "nltk_tokenize", make, "nltk_offline")


# ---- 10. safe build --------------------------------------------------------------------------

_LOCAL_RESOURCES: set[str] = set()
PLUGIN_DATASET_MARKER = "dataset.json"


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def register_local_resource(path: str | os.PathLike) -> None:
    """Mark a folder as supplied by the user: build() uses it as it is, never downloads into it."""
    _LOCAL_RESOURCES.add(_key(path))


def is_local_resource(path: str | os.PathLike) -> bool:
    return _key(path) in _LOCAL_RESOURCES


def _built_version(dpath: Path) -> str | None:
    """The version line of CRSLab's `.built` marker ('' if it has none), None without marker."""
    marker = dpath / ".built"
    if not marker.is_file():
        return None
    lines = marker.read_text(encoding="utf-8", errors="replace").split("\n")
    return lines[1] if len(lines) > 1 else ""


def _pretrain_hint(dpath: Path) -> str:
    try:
        pretrain = Path(_key(_module("crslab.config").PRETRAIN_PATH))
    except Exception:
        return ""
    if Path(_key(dpath)).parent.parent == pretrain:
        kind = Path(dpath).parent.name
        return f", or set `pretrained_path: {{{kind}: DIR}}` in the config to load a local model"
    return ""


def _download(url: str, folder: Path, file_name: str, attempts: int = 2) -> None:
    import requests

    target = folder / file_name
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=(15, 120),
                              headers={"User-Agent": "Mozilla/5.0"}) as response:
                response.raise_for_status()
                with open(target, "wb") as f:
                    for chunk in response.iter_content(1 << 16):
                        f.write(chunk)
            return
        except (requests.ConnectionError, requests.Timeout):
            if attempt == attempts:
                raise
            time.sleep(attempt)


def _reason(exc: BaseException) -> str:
    """A short cause for a failed download."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "no connection"
    if isinstance(exc, AssertionError):
        return "checksum mismatch: the hosted file changed or the download is broken"
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fetch(dfile: Any, staging: Path) -> None:
    """Download dfile into ``staging``, verify its checksum and unpack it (CRSLab's steps)."""
    download = _module("crslab.download")
    if dfile.from_google:
        download.download_from_google_drive(dfile.url, str(staging / dfile.file_name))
    else:
        _download(dfile.url, staging, dfile.file_name)
    dfile.checksum(str(staging))
    if dfile.zipped:
        download.untar(str(staging), dfile.file_name)


def safe_build(dpath: str, dfile: Any, version: str | None = None) -> None:
    """crslab.download.build that never deletes a folder and fails with a UserError.

    - a folder registered with :func:`register_local_resource`: used as it is;
    - `.built` with this version: CRSLab's download, used as it is;
    - a folder holding ``dataset.json`` (made by lotcrs_plugin), or with files but no `.built`,
      or a `.built` of another version: UserError, nothing touched; except that a folder
      holding the archive ``dfile.file_name`` (put there by the user) is verified and unpacked;
    - absent or empty: downloaded into a temporary sibling, renamed into place when complete;
      a failed download raises a UserError naming the URL, the file and where to put it.
    """
    download = _module("crslab.download")
    path = Path(dpath)
    if is_local_resource(path):
        return
    if download.check_build(str(path), version):
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, but CRSLab expects a folder there for {dfile.file_name}; "
                        "move the file away")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    what = f"CRSLab's download of {dfile.file_name}" + (f" version {version}" if version else "")
    if PLUGIN_DATASET_MARKER in entries:
        raise UserError(f"{path} holds a dataset made by lotcrs_plugin ({PLUGIN_DATASET_MARKER}), not "
                        f"{what}; select it by its own dataset name, or move it away to let CRSLab "
                        "download its data there")
    if dfile.file_name in entries and ".built" not in entries:
        _install_archive(path, dfile, version)
        return
    if entries:
        found = _built_version(path)
        if found is None:
            raise UserError(f"{path} exists and is not {what} (no .built marker: made by hand?); it is "
                            f"left untouched: move it away to let CRSLab download there, or put "
                            f"{dfile.file_name} into it to install that archive{_pretrain_hint(path)}")
        raise UserError(f"{path} exists and is not {what} (its .built names version {found or '(none)'}); "
                        f"it is left untouched: move or delete it yourself to let CRSLab download "
                        f"version {version}{_pretrain_hint(path)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.download-", dir=path.parent))
    try:
        try:
            _fetch(dfile, staging)
        except Exception as exc:
            raise UserError(
                f"cannot download {dfile.file_name} from {dfile.url} ({_reason(exc)}); download it "
                f"yourself and put it at {path / dfile.file_name} (it is checked and unpacked on "
                f"the next run){_pretrain_hint(path)}") from None
        download.mark_done(str(staging), version)
        if path.is_dir():
            path.rmdir()  # empty: checked above
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # our own temporary folder


def _install_archive(path: Path, dfile: Any, version: str | None) -> None:
    """Unpack an archive the user put into ``path`` (kept there), after checking its hash."""
    download = _module("crslab.download")
    try:
        dfile.checksum(str(path))
    except AssertionError:
        raise UserError(f"{path / dfile.file_name} does not have the SHA-256 CRSLab expects "
                        f"({dfile.hashcode}); download it again from {dfile.url}") from None
    if dfile.zipped:
        download.untar(str(path), dfile.file_name, deleteTar=False)
    download.mark_done(str(path), version)


def _patch_safe_build() -> None:
    """Symptom: crslab.download.build DELETES dpath (rmtree) when its `.built` names another
    version, and downloads into any folder without `.built` (offline: 15 s of retries, then a
    RuntimeError). :func:`safe_build` replaces it in crslab.download and in every crslab module
    that imported it (dataset base, model base, conv and standard evaluators)."""
    download = _module("crslab.download")
    importlib.import_module("crslab.evaluator")
    original = download.build
    if _is_patched(original):
        return
    ORIGINALS["safe_build"] = original
    _replace_everywhere(original, _mark(safe_build, "safe_build"))


# ---- 11. local pretrained models -------------------------------------------------------------

PRETRAINED_KINDS = ("bert", "gpt2")


def pretrained_override(opt: Any, dpath: str | os.PathLike) -> str | None:
    """The folder of ``opt['pretrained_path'][kind]`` when ``dpath`` is PRETRAIN_PATH/<kind>/<lang>."""
    getter = getattr(opt, "get", None)
    mapping = getter("pretrained_path", None) if getter else None
    if not mapping:
        return None
    if not isinstance(mapping, dict):
        raise UserError(f"config key pretrained_path must be a mapping like {{bert: DIR, gpt2: DIR}}, "
                        f"not {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(PRETRAINED_KINDS))
    if unknown:
        raise UserError(f"pretrained_path: unknown key(s) {', '.join(map(str, unknown))}; known: "
                        f"{', '.join(PRETRAINED_KINDS)}")
    path = Path(dpath)
    kind = path.parent.name
    pretrain = _key(_module("crslab.config").PRETRAIN_PATH)
    if kind not in mapping or _key(path.parent.parent) != pretrain:
        return None
    local = mapping[kind]
    if not isinstance(local, (str, os.PathLike)):
        raise UserError(f"pretrained_path.{kind} must be a folder path, not {type(local).__name__}")
    local_path = Path(local).expanduser()
    if not (local_path / "config.json").is_file():
        raise UserError(f"pretrained_path.{kind}: {local_path} is not a saved Hugging Face model folder "
                        "(no config.json); save one with model.save_pretrained(DIR)")
    return str(local_path.resolve())


def _patch_pretrained_path() -> None:
    """Feature (config key ``pretrained_path: {bert: DIR, gpt2: DIR}``): a model whose resource
    folder is PRETRAIN_PATH/<kind>/<lang> loads from DIR instead, and build() does nothing for
    it (DIR is registered as a local resource). BaseModel.__init__ is wrapped, so every CRSLab
    model (BERT, TGRec, InspiredRec, GPT2, TGConv, InspiredConv, the policy BERTs) and
    plugin model takes it; the interactive-mode tokenizers of BaseSystem read DIR too."""
    base = _module("crslab.model.base").BaseModel
    system = _module("crslab.system.base").BaseSystem

    def make_init(original: Callable) -> Callable:
        def __init__(self, opt, device, dpath=None, resource=None):
            if dpath is not None and resource is not None:
                local = pretrained_override(opt, dpath)
                if local is not None:
                    register_local_resource(local)
                    dpath = local
            original(self, opt, device, dpath, resource)
        return __init__

    def make_tokenize(original: Callable) -> Callable:
        def tokenize(self, text, path):
            local = pretrained_override(self.opt, path)
            return original(self, text, local if local is not None else path)
        return tokenize

    _patch_method(base, "__init__", make_init, "pretrained_path")
    _patch_method(system, "bert_tokenize", make_tokenize, "pretrained_path")
    _patch_method(system, "gpt2_tokenize", make_tokenize, "pretrained_path")


# ---- 12. TextCNN convolution -----------------------------------------------------------------

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


# ---- 13. TextCNN token table ----------------------------------------------------------------

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


# ---- 14. KGSF copy mask for datasets CRSLab does not know ------------------------------------

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


# ---- entry point -----------------------------------------------------------------------------

_POST_IMPORT: dict[str, Callable[[], None]] = {
    "position_codes": _patch_position_codes,
    "plateau": _patch_plateau,
    "as_number": _patch_as_number,
    "gpt2_cache": _patch_gpt2_cache,
    "kbrd_user": _patch_kbrd_user,
    "embedding_metrics": _patch_embedding_metrics,
    "conv_evaluator": _patch_conv_evaluator,
    "backward": _patch_backward,
    "tensorboard_dir": _patch_tensorboard_dir,
    "nltk_offline": _patch_nltk_offline,
    "safe_build": _patch_safe_build,
    "pretrained_path": _patch_pretrained_path,
    "textcnn_conv1d": _patch_textcnn_conv1d,
    "textcnn_vocab": _patch_textcnn_vocab,
    "kgsf_copy_mask": _patch_kgsf_copy_mask,
}


def _skipped(skip: Iterable[str]) -> set[str]:
    names = set(skip)
    env = os.environ.get(SKIP_ENV_VAR, "")
    names |= {n.strip() for n in env.split(",") if n.strip()}
    unknown = names - set(PATCH_NAMES)
    if unknown:
        raise ValueError(f"unknown compat patch(es) {sorted(unknown)}; known: {', '.join(PATCH_NAMES)}")
    return names


def apply(skip: Iterable[str] = ()) -> None:
    """Import crslab and apply every patch not in ``skip`` or $LOTCRS_COMPAT_SKIP (idempotent).

    Skipping 'adamw' or 'fasttext' makes the crslab import fail as it does unpatched (where
    fasttext is not installed).
    """
    skipped = _skipped(skip)
    if "fasttext" not in skipped and "fasttext" not in _applied:
        _fasttext_optional()
        _applied.add("fasttext")
    importlib.import_module("crslab.data")
    importlib.import_module("crslab.model")
    if "adamw" in skipped:
        importlib.import_module("crslab.system")
    elif "adamw" not in _applied:
        _import_system_with_adamw()
        _applied.add("adamw")
    importlib.import_module("crslab.evaluator")
    for name in POST_IMPORT_PATCHES:
        if name in skipped or name in _applied:
            continue
        _POST_IMPORT[name]()
        _applied.add(name)


def applied() -> frozenset[str]:
    """The names of the patches applied in this process."""
    return frozenset(_applied)
