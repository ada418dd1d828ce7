"""``backbone: bart``: an encoder-decoder with its LM head (BartForConditionalGeneration-style).

Loaded with AutoConfig / AutoTokenizer / AutoModelForSeq2SeqLM. Items are predicted by mask
infilling, the way BART is pre-trained: the encoder reads the (masked) input, the decoder is fed
the same input shifted right by one (``decoder_start_token_id`` first), so the decoder output at
position t predicts the token at input position t, and the state at the [MASK] position scores
the item tokens. The decoder is fed the MASKED input, not the original: at recommendation time
the original is unknown, and a multi-token keyword must not leak through the decoder's input.

The representation of a context is read from the encoder: by default the mean of its first and
last layer over real tokens (LOT-CRS's choice for BART), or its first (<s>) state ('cls').
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.base import DEFAULT_PROMPT, Backbone, Vocabulary, load_hf
from lotcrs_plugin.model.backbones.inputs import EntityKG, TokenBatch
from lotcrs_plugin.model.backbones.registry import register_backbone


@register_backbone("bart")
class BartBackbone(Backbone):
    default_pooling = "first_last"
    default_projection = False
    name_prefix = " "

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT, source: str = ""):
        super().__init__(tokenizer, prompt, source)
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Mapping[str, str], *, kg: EntityKG | None = None,
                        prompt: str = DEFAULT_PROMPT) -> "BartBackbone":
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        if not isinstance(path, str):
            raise UserError(f"backbone_path for bart must be one model name or folder, not {path!r}")
        tokenizer = load_hf(AutoTokenizer.from_pretrained, path, "tokenizer")
        if tokenizer.mask_token is None:
            raise UserError(f"backbone_path: the tokenizer of {path!r} has no mask token; bart needs one")
        config = load_hf(AutoConfig.from_pretrained, path, "config")
        if not getattr(config, "is_encoder_decoder", False):
            raise UserError(f"backbone_path: {path!r} is a {config.model_type} model, not an encoder-decoder; "
                            f"use backbone: bert for encoders")
        model = load_hf(AutoModelForSeq2SeqLM.from_pretrained, path, "encoder-decoder model", config=config)
        return cls(model, tokenizer, prompt, source=path)

    def _save_models(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _vocabularies(self) -> list[Vocabulary]:
        # BartForConditionalGeneration's resize also grows final_logits_bias
        model = self.model
        return [Vocabulary(self.tokenizer, lambda n: model.resize_token_embeddings(n, mean_resizing=False),
                           model.get_input_embeddings, self.name_prefix, model.get_output_embeddings)]

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(config.d_model if hasattr(config, "d_model") else config.hidden_size)

    def _decoder_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_token_id
        shifted = input_ids.new_full(input_ids.shape, int(start))
        shifted[:, 1:] = input_ids[:, :-1]
        return shifted

    def encode(self, batch: TokenBatch) -> torch.Tensor:
        out = self.model.get_decoder()(
            input_ids=self._decoder_inputs(batch.input_ids),
            encoder_hidden_states=self._encoder(batch).last_hidden_state,
            encoder_attention_mask=batch.attention_mask,
        )
        return out.last_hidden_state

    def _encoder(self, batch: TokenBatch, hidden_states: bool = False):
        return self.model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        output_hidden_states=hidden_states)

    def _final_bias(self) -> torch.Tensor | None:
        bias = getattr(self.model, "final_logits_bias", None)
        return bias.reshape(-1) if bias is not None else None

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return F.linear(hidden, head.weight, _combine(getattr(head, "bias", None), self._final_bias()))

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(*self.item_head(hidden))

    def item_head(self, hidden: torch.Tensor):
        lo, hi = self.first_item_id, self.first_item_id + self.n_items
        head = self.model.get_output_embeddings()
        bias = _combine(getattr(head, "bias", None), self._final_bias())
        return hidden, head.weight[lo:hi], None if bias is None else bias[lo:hi]

    def _pooling_states(self, batch: TokenBatch, pooling: str):
        out = self._encoder(batch, hidden_states=pooling == "first_last")
        first = out.hidden_states[1] if pooling == "first_last" else None
        return first, out.last_hidden_state, batch.attention_mask


def _combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
