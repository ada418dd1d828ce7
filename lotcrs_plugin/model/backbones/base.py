"""The backbone interface of LOT-CRS.

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

Backbones are chosen by name (lotcrs_plugin.model.backbones.registry).

Shapes: B batch, T positions, H hidden size, V vocabulary size (item tokens included), N items.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.inputs import EntityKG, InputFormat, TokenBatch

ITEM_TOKEN = "<item_{}>"              # the vocabulary token of the catalog's k-th item
MASK_PLACEHOLDER = "[MASK]"           # in a prompt: the backbone's own mask token
DEFAULT_PROMPT = "you should watch [MASK]"
POOLINGS = ("cls", "mean", "first_last")
EXPORT_FILE = "lotcrs_backbone.json"  # marks a folder written by Backbone.save_pretrained
EXPORT_FORMAT = "lotcrs-backbone"


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
    # the token-wise layers run on the real tokens only where the backbone can (the packed_tokens key)
    pack_tokens: bool = True

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
