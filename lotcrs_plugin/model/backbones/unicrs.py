"""``backbone: unicrs``: UniCRS (Wang et al., KDD 2022) as a LOT-CRS backbone, compact.

Parts, as in UniCRS:

- a text encoder (RoBERTa-style, ``AutoModel``) over the context;
- a knowledge prompt: an R-GCN (torch_geometric ``RGCNConv``, 8 bases, entity dim = hidden/2)
  over the dataset's entity KG gives every entity a vector; the context's entities and the
  encoder's token states attend to each other (one bilinear cross attention), are projected and
  turned into per-layer key/value prefixes (a ``DynamicCache``) of
- a GPT-2-style decoder (``AutoModelForCausalLM``, e.g. DialoGPT-small) that reads the context
  conditioned on those prefixes.

Recommendation matches the decoder's state to item embeddings, as UniCRS does: an item's vector
is its item-token row of the decoder's (tied) output embedding PLUS its projected KG entity
embedding, and :meth:`item_logits` / the item columns of :meth:`lm_logits` are dot products with
it. The decoder is causal: the state at a position has read that position's (masked) token and
everything before it, and predicts that position's original token; the entity prompt only holds
entities whose keyword is not masked, so a masked item cannot leak through the KG.

Both models tokenize the same byte-level BPE (RoBERTa and GPT-2 share it, with different ids):
the batch holds decoder ids and the text encoder reads them through an id translation table
(tokens matched by string), so one tokenization serves both. ``backbone_path`` is a folder with
``text_encoder/`` and ``decoder/`` subfolders, or a mapping ``{text_encoder: ..., decoder: ...}``.
The decoder's tokenizer gets a ``<mask>`` token (and pads with its end-of-text token). UniCRS
freezes both language models; here everything trains, because the new item tokens must learn.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones.base import DEFAULT_PROMPT, Backbone, Vocabulary, load_hf
from lotcrs_plugin.model.backbones.inputs import EntityKG, TokenBatch
from lotcrs_plugin.model.backbones.registry import register_backbone

N_BASES = 8
MIN_SHARED_VOCAB = 0.9   # share of decoder tokens the text encoder must know by string
PROMPT_FILE = "knowledge_prompt.pt"
META_FILE = "unicrs.json"


def _residual_mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim))


class KnowledgePrompt(nn.Module):
    """Entity embeddings from the R-GCN, fused with the text encoder's token states into
    per-layer key/value prefixes for the decoder (UniCRS's KGPrompt, compact)."""

    def __init__(self, kg: EntityKG, hidden: int, encoder_hidden: int, n_layer: int, n_head: int):
        super().__init__()
        from torch_geometric.nn import RGCNConv

        entity_dim = hidden // 2
        self.n_entity, self.n_relation = kg.n_entity, kg.n_relation
        self.n_layer, self.n_head, self.hidden = n_layer, n_head, hidden
        self.rgcn = RGCNConv(kg.n_entity, entity_dim, kg.n_relation, num_bases=N_BASES)
        self.register_buffer("edge_index", kg.edge_index.clone(), persistent=False)
        self.register_buffer("edge_type", kg.edge_type.clone(), persistent=False)
        self.entity_proj1 = _residual_mlp(entity_dim)
        self.entity_proj2 = nn.Linear(entity_dim, hidden)
        self.token_proj1 = _residual_mlp(encoder_hidden)
        self.token_proj2 = nn.Linear(encoder_hidden, hidden)
        self.cross_attn = nn.Linear(hidden, hidden, bias=False)
        self.prompt_proj1 = _residual_mlp(hidden)
        self.prompt_proj2 = nn.Linear(hidden, n_layer * 2 * hidden)

    def entity_embeddings(self) -> torch.Tensor:
        """(n_entity, hidden) every entity's vector (id 0, padding, included)."""
        h = self.rgcn(None, self.edge_index, self.edge_type)
        h = self.entity_proj1(h) + h
        return self.entity_proj2(h)

    def forward(self, entity_table: torch.Tensor, entity_ids: torch.Tensor, token_states: torch.Tensor,
                token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix states (B, P, n_layer * 2 * hidden) and their mask (B, P), P = entities + tokens."""
        tokens = self.token_proj2(self.token_proj1(token_states) + token_states)      # (B, T, H)
        ents, ent_mask = _compress(entity_ids)                                         # (B, K)
        entities = entity_table[ents]                                                  # (B, K, H)
        tok_mask = token_mask.bool()
        if ents.shape[1]:
            attn = self.cross_attn(tokens) @ entities.transpose(1, 2)                  # (B, T, K)
            neg = torch.finfo(attn.dtype).min
            to_entities = torch.softmax(attn.masked_fill(~ent_mask[:, None, :], neg), -1)
            to_entities = to_entities * ent_mask.any(1)[:, None, None].to(attn.dtype)  # rows without entities
            to_tokens = torch.softmax(attn.transpose(1, 2).masked_fill(~tok_mask[:, None, :], neg), -1)
            entities, tokens = to_tokens @ tokens + entities, to_entities @ entities + tokens
        prompt = torch.cat([entities, tokens], 1)
        prompt = self.prompt_proj2(self.prompt_proj1(prompt) + prompt)
        return prompt, torch.cat([ent_mask, tok_mask], 1)

    def to_cache(self, prompt: torch.Tensor):
        """A DynamicCache holding the prefix keys and values of every decoder layer."""
        from transformers import DynamicCache

        b, p, _ = prompt.shape
        head_dim = self.hidden // self.n_head
        kv = prompt.view(b, p, self.n_layer, 2, self.n_head, head_dim).permute(2, 3, 0, 4, 1, 5)
        cache = DynamicCache()
        for layer in range(self.n_layer):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache


def _compress(entity_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with zeros -> (B, K) the non-zero ids of each row first, K the largest count."""
    if entity_ids is None:
        raise UserError("the unicrs backbone needs batch.entity_ids (the context's entities)")
    present = entity_ids > 0
    k = int(present.sum(1).max()) if entity_ids.numel() else 0
    order = torch.sort(present.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    ids = torch.gather(entity_ids, 1, order)
    return ids, ids > 0


@register_backbone("unicrs")
class UniCRSBackbone(Backbone):
    default_pooling = "mean"
    default_projection = False
    name_prefix = " "

    def __init__(self, decoder: nn.Module, text_encoder: nn.Module, tokenizer: Any, encoder_tokenizer: Any,
                 kg: EntityKG, prompt: str = DEFAULT_PROMPT, source: Any = ""):
        super().__init__(tokenizer, prompt, source)
        self.decoder = decoder
        self.text_encoder = text_encoder
        self.encoder_tokenizer = encoder_tokenizer
        cfg = decoder.config
        self.knowledge = KnowledgePrompt(kg, cfg.hidden_size, text_encoder.config.hidden_size,
                                         cfg.num_hidden_layers, cfg.num_attention_heads)
        self.register_buffer("item_entities", torch.zeros(0, dtype=torch.long), persistent=False)
        self._entity_table: torch.Tensor | None = None
        self._build_translation()
        sig = inspect.signature(type(self.decoder.base_model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in sig else "past_key_values"  # renamed during transformers 5

    # -- construction

    @classmethod
    def from_pretrained(cls, path: str | Mapping[str, str], *, kg: EntityKG | None = None,
                        prompt: str = DEFAULT_PROMPT) -> "UniCRSBackbone":
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        if kg is None:
            raise UserError("the unicrs backbone needs the dataset's entity KG (side_data['entity_kg'])")
        enc_path, dec_path = _paths(path)
        dec_tok = load_hf(AutoTokenizer.from_pretrained, dec_path, "decoder tokenizer")
        enc_tok = load_hf(AutoTokenizer.from_pretrained, enc_path, "text encoder tokenizer")
        dec_cfg = load_hf(AutoConfig.from_pretrained, dec_path, "decoder config")
        decoder = load_hf(AutoModelForCausalLM.from_pretrained, dec_path, "decoder", config=dec_cfg)
        encoder = load_hf(AutoModel.from_pretrained, enc_path, "text encoder")
        if dec_tok.mask_token is None:  # GPT-2 has none; the new row starts at the mean embedding
            from transformers import AddedToken

            dec_tok.add_special_tokens({"mask_token": AddedToken("<mask>", lstrip=True, special=True)})
            decoder.resize_token_embeddings(len(dec_tok), mean_resizing=False)
            with torch.no_grad():
                weight = decoder.get_input_embeddings().weight
                weight[-1] = weight[:-1].mean(0)
        if dec_tok.pad_token is None:
            dec_tok.pad_token = dec_tok.eos_token
        if enc_tok.mask_token is None:
            raise UserError(f"backbone_path: the text encoder tokenizer of {enc_path!r} has no mask token")
        backbone = cls(decoder, encoder, dec_tok, enc_tok, kg, prompt, source=path)
        state = Path(str(path)) / PROMPT_FILE if isinstance(path, str) else None
        if state is not None and state.is_file():
            meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
            if (meta["n_entity"], meta["n_relation"]) != (kg.n_entity, kg.n_relation):
                raise UserError(f"{path}: its knowledge prompt was trained on a KG of {meta['n_entity']} entities and "
                                f"{meta['n_relation']} relations, this dataset has {kg.n_entity} and {kg.n_relation}")
            backbone.knowledge.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
        return backbone

    def _save_models(self, folder: Path) -> None:
        for sub, model, tok in (("decoder", self.decoder, self.tokenizer),
                                ("text_encoder", self.text_encoder, self.encoder_tokenizer)):
            model.save_pretrained(folder / sub)
            tok.save_pretrained(folder / sub)
        torch.save(self.knowledge.state_dict(), folder / PROMPT_FILE)
        (folder / META_FILE).write_text(json.dumps({"n_entity": self.knowledge.n_entity,
                                                    "n_relation": self.knowledge.n_relation}), encoding="utf-8")

    def _vocabularies(self) -> list[Vocabulary]:
        return [
            Vocabulary(self.tokenizer, lambda n: self.decoder.resize_token_embeddings(n, mean_resizing=False),
                       self.decoder.get_input_embeddings, self.name_prefix,
                       self.decoder.get_output_embeddings),
            Vocabulary(self.encoder_tokenizer,
                       lambda n: self.text_encoder.resize_token_embeddings(n, mean_resizing=False),
                       self.text_encoder.get_input_embeddings, self.name_prefix),
        ]

    def _items_added(self) -> None:
        if self.item_entity_ids and len(self.item_entity_ids) != self.n_items:
            raise UserError("unicrs: give one entity id per item")
        if not self.item_entity_ids:
            raise UserError("the unicrs backbone needs the items' entity ids (add_item_tokens(names, entity_ids))")
        self.item_entities = torch.tensor(self.item_entity_ids, dtype=torch.long,
                                          device=self.knowledge.edge_index.device)
        self._build_translation()

    def _build_translation(self) -> None:
        """dec2enc[i] = the text encoder's id of the decoder token i (same string), else its unk."""
        dec, enc = self.tokenizer, self.encoder_tokenizer
        enc_vocab = enc.get_vocab()
        unk = enc.unk_token_id if enc.unk_token_id is not None else 0
        table = torch.full((len(dec),), int(unk), dtype=torch.long)
        known = 0
        for token, i in dec.get_vocab().items():
            j = enc_vocab.get(token)
            if j is not None and i < len(table):
                table[i] = j
                known += 1
        enc_end = enc.sep_token_id if enc.sep_token_id is not None else enc.eos_token_id
        for dec_id, enc_id in ((dec.eos_token_id, enc_end), (dec.mask_token_id, enc.mask_token_id)):
            if dec_id is not None and enc_id is not None:
                table[dec_id] = enc_id
        if known < MIN_SHARED_VOCAB * len(dec):
            raise UserError(f"unicrs: the text encoder knows only {known} of the decoder's {len(dec)} tokens; it "
                            f"needs the same byte-level BPE vocabulary (e.g. roberta-base with DialoGPT/GPT-2)")
        device = self.knowledge.edge_index.device
        if hasattr(self, "dec2enc"):
            self.dec2enc = table.to(device)
        else:
            self.register_buffer("dec2enc", table, persistent=False)

    # -- format: DialoGPT ends every turn with its end-of-text token and has no start token

    @property
    def bos_ids(self) -> list[int]:
        return []

    @property
    def sep_ids(self) -> list[int]:
        return [int(self.tokenizer.eos_token_id)]

    # -- the model

    @property
    def hidden_size(self) -> int:
        return int(self.decoder.config.hidden_size)

    def _decode(self, batch: TokenBatch, hidden_states: bool = False):
        table = self.knowledge.entity_embeddings()
        self._entity_table = table  # read by lm_logits / item_logits of the same forward
        ids, mask = batch.input_ids, batch.attention_mask
        tokens = self.text_encoder(input_ids=self.dec2enc[ids], attention_mask=mask).last_hidden_state
        prompt, prompt_mask = self.knowledge(table, batch.entity_ids, tokens, mask)
        cache = self.knowledge.to_cache(prompt)
        full_mask = torch.cat([prompt_mask.to(mask.dtype), mask], 1)
        return self.decoder.base_model(input_ids=ids, attention_mask=full_mask, use_cache=False,
                                       output_hidden_states=hidden_states, **{self._cache_kwarg: cache})

    def encode(self, batch: TokenBatch) -> torch.Tensor:
        return self._decode(batch).last_hidden_state

    def _item_vectors(self) -> torch.Tensor:
        table = self._entity_table if self._entity_table is not None else self.knowledge.entity_embeddings()
        return table[self.item_entities]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.get_output_embeddings()(hidden)
        lo, hi = self.first_item_id, self.first_item_id + self.n_items
        if not self.n_items:
            return logits
        kg = hidden @ self._item_vectors().to(hidden.dtype).t()
        return torch.cat([logits[..., :lo], logits[..., lo:hi] + kg, logits[..., hi:]], -1)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(*self.item_head(hidden))

    def item_head(self, hidden: torch.Tensor):
        lo, hi = self.first_item_id, self.first_item_id + self.n_items
        head = self.decoder.get_output_embeddings()
        weight = head.weight[lo:hi] + self._item_vectors().to(head.weight.dtype)
        bias = getattr(head, "bias", None)
        return hidden, weight, None if bias is None else bias[lo:hi]

    def _pooling_states(self, batch: TokenBatch, pooling: str):
        out = self._decode(batch, hidden_states=pooling == "first_last")
        first = out.hidden_states[1] if pooling == "first_last" else None
        return first, out.last_hidden_state, batch.attention_mask

    def _cls_state(self, last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A causal decoder summarises at its last real token."""
        idx = (mask.long().sum(1) - 1).clamp_min(0)
        return last[torch.arange(last.shape[0], device=last.device), idx]


def _paths(path: str | Mapping[str, str]) -> tuple[str, str]:
    if isinstance(path, Mapping):
        unknown = sorted(set(path) - {"text_encoder", "decoder"})
        if unknown or not {"text_encoder", "decoder"} <= set(path):
            raise UserError(f"backbone_path for unicrs: a mapping needs exactly the keys text_encoder and decoder, "
                            f"got {', '.join(map(str, path)) or 'none'}")
        return os.path.expanduser(str(path["text_encoder"])), os.path.expanduser(str(path["decoder"]))
    folder = Path(os.path.expanduser(str(path)))
    if (folder / "decoder").is_dir() and (folder / "text_encoder").is_dir():
        return str(folder / "text_encoder"), str(folder / "decoder")
    raise UserError(f"backbone_path for unicrs: {path!r} must be a folder with text_encoder/ and decoder/ "
                    f"subfolders, or a mapping {{text_encoder: roberta-base, decoder: microsoft/DialoGPT-small}}")
