"""The backbone interface of LOT-CRS and the registry of backbones.

A backbone is a pretrained language model made ready for conversational recommendation:

- every catalog item is one vocabulary token (:meth:`Backbone.add_item_tokens`), initialised
  with the mean embedding of the tokens of the item's name;
- a context is the dialog's turns, each followed by the separator, truncated from the LEFT to
  ``max_length`` (the most recent turns are kept), optionally followed by the prompt
  (default ``"you should watch [MASK]"``; ``[MASK]`` stands for the backbone's own mask token)
  (:meth:`Backbone.format_input`);
- :meth:`~Backbone.encode` gives one hidden state per input position, :meth:`~Backbone.lm_logits`
  scores the whole vocabulary (item tokens included) from such states, and
  :meth:`~Backbone.item_logits` scores the items only: the item-token rows of the prediction
  head, the verbaliser; :meth:`~Backbone.context_representation` pools a context into one vector.

Backbones are chosen by name (config key ``backbone``). A new backbone is ONE module in this
package that defines a :class:`Backbone` subclass decorated with ``@register_backbone("name")``:
the package's modules are imported on the first lookup. A name taken twice is refused.

Shapes: B batch, T positions, H hidden size, V vocabulary size (item tokens included), N items.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.errors import UserError

ITEM_TOKEN = "<item_{}>"              # the vocabulary token of the catalog's k-th item
MASK_PLACEHOLDER = "[MASK]"           # in a prompt: the backbone's own mask token
DEFAULT_PROMPT = "you should watch [MASK]"
POOLINGS = ("cls", "mean", "first_last")
EXPORT_FILE = "lotcrs_backbone.json"  # marks a folder written by Backbone.save_pretrained
EXPORT_FORMAT = "lotcrs-backbone"


# ---- batches ---------------------------------------------------------------------------------

@dataclass
class TokenBatch:
    """A padded batch of formatted inputs (right padding).

    input_ids, attention_mask: (B, T) long. keyword_mask: (B, T) bool, the positions of keyword
    tokens (item tokens and the tokens of attribute names). entity_ids: (B, T) long, the dataset
    entity id of a keyword at the FIRST token of its span, 0 elsewhere. mask_positions: (B,) long,
    the position of the prompt's mask token (-1 when there is no prompt).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keyword_mask: torch.Tensor | None = None
    entity_ids: torch.Tensor | None = None
    mask_positions: torch.Tensor | None = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TokenBatch":
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TokenBatch(**{k: fn(v) if v is not None else None for k, v in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TokenBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TokenBatch":
        return self._map(lambda t: t.pin_memory())

    def replace(self, **changes: Any) -> "TokenBatch":
        return dataclasses.replace(self, **changes)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EntityKG:
    """The dataset's entity graph, as UniCRS's R-GCN reads it (both directions and self loops
    are already in ``side_data['entity_kg']['edge']`` of the processed datasets)."""

    n_entity: int
    n_relation: int
    edge_index: torch.Tensor  # (2, E) long: heads, tails
    edge_type: torch.Tensor   # (E,) long

    @classmethod
    def from_side_data(cls, side_data: Mapping[str, Any], n_entity: int) -> "EntityKG":
        """From CRSLab's ``side_data`` (``entity_kg.edge`` as (head, tail, relation) rows)."""
        kg = side_data.get("entity_kg") if side_data else None
        if not kg or "edge" not in kg:
            raise UserError("the dataset has no entity KG (side_data['entity_kg']); the unicrs backbone needs one")
        edges = torch.as_tensor(np.asarray(kg["edge"], dtype=np.int64).reshape(-1, 3))
        n_relation = int(kg.get("n_relation", int(edges[:, 2].max()) + 1 if len(edges) else 1))
        return cls(int(n_entity), n_relation, edges[:, :2].t().contiguous(), edges[:, 2].contiguous())


@dataclass(frozen=True)
class InputFormat:
    """How a backbone turns a context into one input (see :meth:`build`)."""

    bos_ids: tuple[int, ...]
    sep_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    prompt_mask_index: int
    pad_id: int
    mask_id: int
    max_length: int

    def build(self, ids: np.ndarray, keyword: np.ndarray | None = None, entity: np.ndarray | None = None,
              *, prompt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``bos + context[-budget:] (+ prompt + sep)``, at most ``max_length`` ids.

        ``ids``: the context's token ids, every turn followed by ``sep_ids``; ``keyword`` /
        ``entity``: per-token arrays aligned with it. The context is cut from the LEFT (the most
        recent turns stay). Returns (ids, keyword, entity, position of the prompt's mask or -1).
        """
        tail = (self.prompt_ids + self.sep_ids) if prompt else ()
        n_bos, n_tail = len(self.bos_ids), len(tail)
        budget = self.max_length - n_bos - n_tail
        if budget < 1:
            raise UserError(f"max_length {self.max_length} leaves no room for the context (the prompt and "
                            f"special tokens take {n_bos + n_tail})")
        start = max(0, len(ids) - budget)
        n_ctx = len(ids) - start
        out = np.empty(n_bos + n_ctx + n_tail, dtype=np.int64)
        out[:n_bos] = self.bos_ids
        out[n_bos:n_bos + n_ctx] = ids[start:]
        out[n_bos + n_ctx:] = tail
        kw = np.zeros(len(out), dtype=bool)
        ent = np.zeros(len(out), dtype=np.int64)
        if keyword is not None:
            kw[n_bos:n_bos + n_ctx] = keyword[start:]
        if entity is not None:
            ent[n_bos:n_bos + n_ctx] = entity[start:]
        mask_pos = n_bos + n_ctx + self.prompt_mask_index if prompt else -1
        return out, kw, ent, mask_pos


# ---- the interface ---------------------------------------------------------------------------

@dataclass
class Vocabulary:
    """One tokenizer + embedding table pair that receives the item tokens (UniCRS has two)."""

    tokenizer: Any
    resize: Callable[[int], None]              # grow the model's tables to n tokens
    embeddings: Callable[[], nn.Embedding]     # the input embedding table (after resizing)
    name_prefix: str = ""                      # how a name starts inside a sentence
    output_embeddings: Callable[[], nn.Module | None] | None = None  # the LM head's rows, if any


class Backbone(nn.Module):
    """Base class of the LOT-CRS backbones (see the module docstring).

    Subclasses implement :meth:`from_pretrained`, :meth:`_save_models`, :meth:`_vocabularies`,
    :meth:`encode`, :meth:`lm_logits`, :meth:`item_logits` and :meth:`_pooling_states`, and set
    the class attributes below.
    """

    name: ClassVar[str] = ""
    default_pooling: ClassVar[str] = "cls"
    default_projection: ClassVar[bool] = False  # an MLP on the CCA representation while training
    name_prefix: ClassVar[str] = ""             # " " for byte-level BPE (a word inside a sentence)

    def __init__(self, tokenizer: Any, prompt: str = DEFAULT_PROMPT, source: str | Mapping = ""):
        super().__init__()
        self.tokenizer = tokenizer
        self.source = source
        self.item_names: list[str] = []
        self.item_entity_ids: list[int] = []
        self.first_item_id = -1
        self.set_prompt(prompt)

    # -- construction and saving

    @classmethod
    def from_pretrained(cls, path: str | Mapping[str, str], *, kg: EntityKG | None = None,
                        prompt: str = DEFAULT_PROMPT) -> "Backbone":
        """Load from a Hugging Face name or local folder (AutoConfig/AutoTokenizer/AutoModel...)."""
        raise NotImplementedError

    def _save_models(self, folder: Path) -> None:
        """Write the models and tokenizers as Hugging Face folders under ``folder``."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write everything needed to rebuild this backbone (item tokens included): Hugging Face
        folders plus ``lotcrs_backbone.json``; :func:`load_backbone` reads it back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_models(folder)
        meta = {"format": EXPORT_FORMAT, "version": 1, "backbone": self.name, "prompt": self.prompt,
                "item_names": self.item_names, "item_entity_ids": self.item_entity_ids,
                "first_item_id": self.first_item_id, "source": self.source}
        (folder / EXPORT_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        return folder

    def _restore_items(self, meta: Mapping[str, Any]) -> None:
        """Item bookkeeping of an exported backbone (its vocabulary already holds the tokens)."""
        self.item_names = list(meta["item_names"])
        self.item_entity_ids = [int(i) for i in meta["item_entity_ids"]]
        self.first_item_id = int(meta["first_item_id"])
        if self.item_names and self.tokenizer.convert_tokens_to_ids(ITEM_TOKEN.format(0)) != self.first_item_id:
            raise UserError(f"{meta.get('folder', 'exported backbone')}: the tokenizer does not hold the item tokens "
                            f"listed in {EXPORT_FILE}; export the backbone again")

    # -- vocabulary

    def _vocabularies(self) -> list[Vocabulary]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def n_items(self) -> int:
        return len(self.item_names)

    @property
    def item_token_ids(self) -> torch.Tensor:
        """(N,) the vocabulary ids of the item tokens (a contiguous block)."""
        return torch.arange(self.first_item_id, self.first_item_id + self.n_items)

    def item_input_embeddings(self) -> torch.Tensor:
        """(N, H) the item tokens' rows of the input embedding table (a view: it trains with it)."""
        lo = self.first_item_id
        return self._vocabularies()[0].embeddings().weight[lo:lo + self.n_items]

    @staticmethod
    def item_token(index: int) -> str:
        return ITEM_TOKEN.format(index)

    def add_item_tokens(self, item_names: Sequence[str], entity_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Add one token per item (``<item_k>`` for the k-th name), each initialised with the mean
        input embedding of its name's tokens (a name with no tokens keeps the resize's
        initialisation). Output embeddings tied to the inputs follow. Returns the new ids.

        ``entity_ids``: the items' dataset entity ids (UniCRS matches states to KG embeddings).
        Called once per backbone.
        """
        if self.item_names:
            raise RuntimeError("item tokens are already added to this backbone")
        names = [str(n) for n in item_names]
        if not names:
            raise UserError("the catalog is empty: no item tokens to add")
        tokens = [self.item_token(k) for k in range(len(names))]
        first = None
        for voc in self._vocabularies():
            first_here = _add_tokens(voc, tokens, names)
            if voc.tokenizer is self.tokenizer:
                first = first_here
        self.first_item_id = int(first)
        self.item_names = names
        self.item_entity_ids = [int(e) for e in entity_ids] if entity_ids is not None else []
        self._items_added()
        return self.item_token_ids

    def _items_added(self) -> None:
        """Hook for subclasses (e.g. to register item buffers)."""

    # -- formatting

    @property
    def bos_ids(self) -> list[int]:
        """Ids put before the context."""
        tok = self.tokenizer
        first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        return [first] if first is not None else []

    @property
    def sep_ids(self) -> list[int]:
        """Ids that follow every turn (and the prompt): the last one acts as end of sequence."""
        tok = self.tokenizer
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return [sep]

    @property
    def mask_token_id(self) -> int:
        return int(self.tokenizer.mask_token_id)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def set_prompt(self, prompt: str) -> None:
        """Tokenize the prompt; ``[MASK]`` (exactly once) becomes the backbone's mask token."""
        if not isinstance(prompt, str) or prompt.count(MASK_PLACEHOLDER) != 1:
            raise UserError(f"prompt {prompt!r} must contain {MASK_PLACEHOLDER} exactly once "
                            f"(e.g. {DEFAULT_PROMPT!r})")
        tok = self.tokenizer
        if tok.mask_token_id is None:
            raise UserError(f"the {self.name} backbone's tokenizer has no mask token")
        # the text on each side is tokenized on its own: tokenizers differ in how they treat the
        # space before a mask token
        left, right = prompt.split(MASK_PLACEHOLDER)
        left, right = left.rstrip(), right.rstrip()

        def ids(text: str) -> list[int]:
            return tok(self.name_prefix + text.strip() if text.strip() else "", add_special_tokens=False)["input_ids"]

        before = ids(left)
        self.prompt = prompt
        self.prompt_ids = np.asarray(before + [tok.mask_token_id] + ids(right), dtype=np.int64)
        self.prompt_mask_index = len(before)

    def input_format(self, max_length: int) -> "InputFormat":
        """The light, picklable description of how inputs are built (for DataLoader workers)."""
        return InputFormat(tuple(self.bos_ids), tuple(self.sep_ids), tuple(int(i) for i in self.prompt_ids),
                           int(self.prompt_mask_index), self.pad_token_id, self.mask_token_id, int(max_length))

    def format_input(self, ids: np.ndarray, keyword: np.ndarray | None = None, entity: np.ndarray | None = None,
                     *, prompt: bool, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """See :meth:`InputFormat.build`."""
        return self.input_format(max_length).build(ids, keyword, entity, prompt=prompt)

    # -- the model

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def encode(self, batch: TokenBatch) -> torch.Tensor:
        """(B, T, H): the state at each input position, from which that position's token is
        predicted (:meth:`lm_logits`, :meth:`item_logits`)."""
        raise NotImplementedError

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) scores of every vocabulary token, item tokens included."""
        raise NotImplementedError

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., N) scores of the items: the item-token rows of the prediction head."""
        raise NotImplementedError

    def item_head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(features (..., H'), weight (N, H'), bias (N,) or None) such that ``item_logits(hidden)``
        is ``F.linear(features, weight, bias)``: lets evaluation score a large catalog in chunks
        (lotcrs_plugin.evaluator.ranking). None when the head has another form."""
        return None

    def _pooling_states(self, batch: TokenBatch, pooling: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first-layer states, last-layer states, attention mask) that pooling reads; the
        first-layer states may be None unless pooling is 'first_last'."""
        raise NotImplementedError

    def _cls_state(self, last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The 'cls' vector: the first position (encoders); causal decoders override."""
        return last[:, 0]

    def context_representation(self, batch: TokenBatch, pooling: str | None = None) -> torch.Tensor:
        """(B, H) one vector per context: 'cls' (the backbone's summary position), 'mean' (mean of
        the last layer over real tokens) or 'first_last' (mean of first and last layer, SimCSE)."""
        pooling = pooling or self.default_pooling
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r} is not known; use one of {', '.join(POOLINGS)}")
        first, last, mask = self._pooling_states(batch, pooling)
        if pooling == "cls":
            return self._cls_state(last, mask)
        states = last if pooling == "mean" else (first + last) / 2
        m = mask.to(states.dtype).unsqueeze(-1)
        return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


def _add_tokens(voc: Vocabulary, tokens: list[str], names: list[str]) -> int:
    """Add ``tokens`` to one vocabulary, grow the model, set each new row to the mean embedding of
    the matching name's tokens (one embedding_bag call). Returns the first new id."""
    from transformers import AddedToken

    tok = voc.tokenizer
    before = len(tok)
    # lstrip: the token takes the space before it (byte-level BPE would make it a token of its own);
    # normalized=False: matched as written, also by lowercasing tokenizers
    added = tok.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in tokens])
    first = tok.convert_tokens_to_ids(tokens[0])
    if added != len(tokens) or first != before or tok.convert_tokens_to_ids(tokens[-1]) != before + len(tokens) - 1:
        raise UserError(f"the tokenizer already holds tokens like {tokens[0]!r}; item tokens must be new")
    enc = tok([voc.name_prefix + n for n in names], add_special_tokens=False)["input_ids"]
    lengths = torch.from_numpy(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)))
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int64,
                                        count=int(lengths.sum())))
    offsets = torch.cumsum(lengths, 0) - lengths
    voc.resize(len(tok))
    emb = voc.embeddings()
    with torch.no_grad():
        weight = emb.weight
        if flat.numel() and int(flat.max()) >= before:
            raise RuntimeError("an item name was tokenized into an item token")
        has = (lengths > 0).to(weight.device)
        rows = torch.arange(before, before + len(tokens), device=weight.device)
        tables = [weight]
        head = voc.output_embeddings() if voc.output_embeddings is not None else None
        if head is not None and head.weight is not weight and head.weight.shape[0] == len(tok):
            tables.append(head.weight)  # an untied head: its item rows start the same way
        for table in tables:
            means = F.embedding_bag(flat.to(table.device), table[:before], offsets.to(table.device), mode="mean")
            table[rows[has]] = means[has].to(table.dtype)
    return first


# ---- registry --------------------------------------------------------------------------------

_BACKBONES: dict[str, type[Backbone]] = {}
_discovered = False


def register_backbone(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: make a :class:`Backbone` subclass available as ``backbone: name``.

    Refuses a name already taken by another class, and a class that is not a Backbone.
    """
    from lotcrs_plugin.registry import RegistryError

    def decorate(cls: type[Backbone]) -> type[Backbone]:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise RegistryError(f"backbone '{name}': {cls!r} is not a subclass of {Backbone.__module__}.Backbone")
        present = _BACKBONES.get(name)
        if present is not None and present is not cls and present.__qualname__ != cls.__qualname__:
            raise RegistryError(f"cannot register backbone '{name}' as {cls.__module__}.{cls.__qualname__}: the "
                                f"name is already taken by {present.__module__}.{present.__qualname__}; "
                                f"choose another name")
        cls.name = name
        _BACKBONES[name] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every module of this package once, so that their decorators run."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def backbone_names() -> list[str]:
    _discover()
    return sorted(_BACKBONES)


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name``; UserError listing the valid names otherwise."""
    _discover()
    cls = _BACKBONES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UserError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(_BACKBONES))}")
    return cls


def is_export(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path).expanduser() / EXPORT_FILE).is_file()


def build_backbone(name: str, path: str | Mapping[str, str] | os.PathLike, *, kg: EntityKG | None = None,
                   prompt: str = DEFAULT_PROMPT) -> Backbone:
    """The backbone ``name`` loaded from ``path`` (a Hugging Face name, a local folder, or a folder
    written by :meth:`Backbone.save_pretrained`, whose item tokens come along)."""
    cls = backbone_class(name)
    if is_export(path):
        return load_backbone(path, kg=kg, expect=name, prompt=prompt)
    return cls.from_pretrained(_expand(path), kg=kg, prompt=prompt)


def load_backbone(folder: str | os.PathLike, *, kg: EntityKG | None = None, expect: str | None = None,
                  prompt: str | None = None) -> Backbone:
    """Rebuild a backbone written by :meth:`Backbone.save_pretrained` (item tokens included)."""
    folder = Path(folder).expanduser()
    meta_path = folder / EXPORT_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: not a backbone written by lotcrs_plugin ({e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{meta_path}: \"format\" must be {EXPORT_FORMAT!r}")
    name = meta.get("backbone")
    if expect is not None and name != expect:
        raise UserError(f"{folder} holds a '{name}' backbone, but the config says backbone: {expect}")
    cls = backbone_class(name)
    backbone = cls.from_pretrained(str(folder), kg=kg, prompt=prompt or meta.get("prompt", DEFAULT_PROMPT))
    backbone._restore_items({**meta, "folder": str(folder)})
    backbone._items_added()
    backbone.source = meta.get("source", "")
    return backbone


def _expand(path: Any) -> Any:
    if isinstance(path, Mapping):
        return {k: _expand(v) for k, v in path.items()}
    if isinstance(path, (str, os.PathLike)):
        return os.path.expanduser(str(path))  # a hub name has no "~" and passes unchanged
    raise UserError(f"backbone_path must be a model name or folder, not {path!r}")


def load_hf(loader: Callable[..., Any], path: str, what: str, **kwargs: Any) -> Any:
    """``loader(path)`` (an Auto class's from_pretrained) with a one-line UserError when nothing
    can be loaded, e.g. a hub name while offline."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists missing heads; we report them ourselves
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"backbone_path: cannot load the {what} from {path!r} ({first}); give a local "
                        f"folder or a model name that can be downloaded") from None
    finally:
        hf_logging.set_verbosity(verbosity)
