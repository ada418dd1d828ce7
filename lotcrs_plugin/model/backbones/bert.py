"""``backbone: bert``: an encoder with a masked-LM head (BertForMaskedLM-style).

Loaded with AutoConfig / AutoTokenizer / AutoModelForMaskedLM, so any BERT-architecture
checkpoint works (RoBERTa-style ``lm_head`` too). A checkpoint that holds only the encoder (as
all-MiniLM-L6-v2, saved as ``BertModel``) gets a FRESH head: the missing head weights are
detected from the load report, initialised as the architecture initialises them, the output
bias set to zero and the decoder tied to the input embeddings. An item is predicted at a
position from that position's last-layer state; the representation of a context is the [CLS]
state by default (LOT-CRS's BERT + SimCSE, with a projection MLP during CCA training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.base import DEFAULT_PROMPT, Backbone, Vocabulary, load_hf
from lotcrs_plugin.model.backbones.inputs import EntityKG, TokenBatch
from lotcrs_plugin.model.backbones.packed_bert import can_pack, packed_states
from lotcrs_plugin.model.backbones.registry import register_backbone


@register_backbone("bert")
class BertBackbone(Backbone):
    default_pooling = "cls"
    default_projection = True

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT, source: str = ""):
        super().__init__(tokenizer, prompt, source)
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Mapping[str, str], *, kg: EntityKG | None = None,
                        prompt: str = DEFAULT_PROMPT) -> "BertBackbone":
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

        if not isinstance(path, str):
            raise UserError(f"backbone_path for bert must be one model name or folder, not {path!r}")
        tokenizer = load_hf(AutoTokenizer.from_pretrained, path, "tokenizer")
        if tokenizer.mask_token is None:
            raise UserError(f"backbone_path: the tokenizer of {path!r} has no mask token; bert needs a "
                            f"masked-LM vocabulary")
        config = load_hf(AutoConfig.from_pretrained, path, "config")
        model, info = load_hf(AutoModelForMaskedLM.from_pretrained, path, "masked-LM model",
                              config=config, output_loading_info=True)
        missing = set(info.get("missing_keys", ()))
        prefix = model.base_model_prefix + "."
        encoder_missing = sorted(k for k in missing if k.startswith(prefix))
        if encoder_missing:
            logger.warning(f"[bert] {path}: {len(encoder_missing)} encoder weights are not in the checkpoint "
                           f"(e.g. {encoder_missing[0]}); they start random")
        head_missing = sorted(k for k in missing if not k.startswith(prefix))
        if head_missing:
            _fresh_head(model, set(head_missing))
            logger.info(f"[bert] {path} has no masked-LM head: a fresh one is initialised, decoder tied to the "
                        f"input embeddings ({len(head_missing)} tensors)")
        return cls(model, tokenizer, prompt, source=path)

    def _save_models(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _vocabularies(self) -> list[Vocabulary]:
        model = self.model
        return [Vocabulary(self.tokenizer, lambda n: model.resize_token_embeddings(n, mean_resizing=False),
                           model.get_input_embeddings, self.name_prefix, model.get_output_embeddings)]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, batch: TokenBatch) -> torch.Tensor:
        return self._states(batch, first_layer=False)[1]

    def _states(self, batch: TokenBatch, first_layer: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(first layer's states if asked, last layer's states), packed where the encoder allows."""
        base = self.model.base_model
        if self.pack_tokens and can_pack(base):
            return packed_states(base, batch.input_ids, batch.attention_mask, first_layer)
        out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=first_layer)
        return (out.hidden_states[1] if first_layer else None), out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        features, decoder = _head_parts(self.model)
        if features is None:
            return self._head_module()(hidden)
        return F.linear(features(hidden), decoder.weight, _bias(decoder, self.model))

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.item_head(hidden)
        if head is None:  # an unknown head layout: slice the full scores
            return self.lm_logits(hidden)[..., self.first_item_id:self.first_item_id + self.n_items]
        return F.linear(*head)

    def item_head(self, hidden: torch.Tensor):
        lo, hi = self.first_item_id, self.first_item_id + self.n_items
        features, decoder = _head_parts(self.model)
        if features is None:
            return None
        bias = _bias(decoder, self.model)
        return features(hidden), decoder.weight[lo:hi], None if bias is None else bias[lo:hi]

    def _head_module(self) -> nn.Module:
        prefix = self.model.base_model_prefix
        heads = [m for n, m in self.model.named_children() if n != prefix]
        if len(heads) != 1:
            raise UserError(f"bert backbone: cannot find the masked-LM head of {type(self.model).__name__}")
        return heads[0]

    def _pooling_states(self, batch: TokenBatch, pooling: str):
        first, last = self._states(batch, first_layer=pooling == "first_last")
        return first, last, batch.attention_mask


def _head_parts(model: nn.Module):
    """(features function, decoder Linear) of BERT's ``cls.predictions`` or RoBERTa's ``lm_head``;
    (None, None) for another layout."""
    cls_head = getattr(model, "cls", None)
    predictions = getattr(cls_head, "predictions", None)
    if predictions is not None and hasattr(predictions, "transform"):
        return predictions.transform, predictions.decoder
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and all(hasattr(lm_head, a) for a in ("dense", "layer_norm", "decoder")):
        return (lambda h: lm_head.layer_norm(F.gelu(lm_head.dense(h)))), lm_head.decoder
    return None, None


def _bias(decoder: nn.Module, model: nn.Module) -> torch.Tensor | None:
    if getattr(decoder, "bias", None) is not None:
        return decoder.bias
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None:
        return getattr(predictions, "bias", None)
    return getattr(getattr(model, "lm_head", None), "bias", None)


def _fresh_head(model: nn.Module, missing: set[str]) -> None:
    """Initialise every head module whose weights the checkpoint lacked, zero the output bias and
    tie the decoder to the input embeddings."""
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if own and all(k in missing for k in own) and not name.endswith("decoder"):
            model._init_weights(module)
    _, decoder = _head_parts(model)
    with torch.no_grad():
        bias = _bias(decoder, model) if decoder is not None else None
        if bias is not None:
            bias.zero_()
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if out is not None and out.weight is not emb.weight:
        out.weight = emb.weight
