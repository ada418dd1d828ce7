"""The LOT-CRS pre-training model (CRSLab model ``LOTCRSPretrain``): the backbone with the
catalog's item tokens and the CCA projection head; its forward pass gives the DMP and CCA losses
of a micro-batch (the ``lotcrs_pretrain:`` block, lotcrs_plugin.config_blocks.pretrain; trained
by lotcrs_plugin.system.pretrain)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lotcrs_plugin.config_blocks.pretrain import BLOCK, PretrainConfig
from lotcrs_plugin.data.item_vocab import ItemVocab
from lotcrs_plugin.data.pretrain_samples import PretrainBatch
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones import EntityKG, TokenBatch, build_backbone
from lotcrs_plugin.model.cpu_dropout import use_cpu_dropout
from lotcrs_plugin.model.pretrain_losses import ProjectionHead, info_nce, mask_keywords, masked_lm_loss

MODEL_NAME = "LOTCRSPretrain"


class LOTCRSPretrainModel(nn.Module):
    """The backbone with the catalog's item tokens, plus the CCA projection head (CRSLab model
    ``LOTCRSPretrain``, built as ``Model(opt, device, vocab, side_data)``)."""

    def __init__(self, opt: Any, device: Any, vocab: Mapping[str, Any], side_data: Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg = PretrainConfig.from_dict(opt.get(BLOCK, None))
        name = opt.get("backbone", None)
        path = opt.get("backbone_path", None)
        if not name:
            raise UserError("key 'backbone' is missing; set backbone: bert, bart or unicrs")
        if not path:
            raise UserError("key 'backbone_path' is missing; give a Hugging Face model name or a local folder")
        self.items = ItemVocab.from_side_data(side_data, vocab)
        kg = EntityKG.from_side_data(side_data, vocab["n_entity"]) if (side_data or {}).get("entity_kg") else None
        self.backbone = build_backbone(name, path, kg=kg, prompt=cfg.prompt)
        if cfg.cpu_dropout == "fast":
            use_cpu_dropout(self.backbone)
        self.backbone.pack_tokens = cfg.packed_tokens
        if self.backbone.n_items:  # a pre-trained export: its items must be this catalog's
            if self.backbone.item_entity_ids and self.backbone.item_entity_ids != self.items.entity_ids:
                raise UserError(f"backbone_path {path}: its item tokens belong to another catalog "
                                f"({self.backbone.n_items} items) than dataset {opt.get('dataset')!r} "
                                f"({len(self.items)} items)")
        else:
            self.backbone.add_item_tokens(self.items.display_names, self.items.entity_ids)
        limit = _max_positions(self.backbone)
        if limit is not None and cfg.max_length > limit:
            raise UserError(f"{BLOCK}.max_length {cfg.max_length} exceeds the backbone's {limit} positions")
        use_projection = self.backbone.default_projection if cfg.projection == "auto" else bool(cfg.projection)
        self.projection = ProjectionHead(self.backbone.hidden_size) if use_projection else None
        self.backbone_name, self.backbone_path = name, path

    def forward(self, batch: PretrainBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The losses of a micro-batch: 'total' (weighted DMP + CCA, with its graph; absent when
        the batch has no task) and its parts, detached. One forward, so that DDP sees the step."""
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        total = None
        if cfg.dmp_weight > 0 and batch.dmp is not None:
            loss, acc = self.dmp(batch.dmp, generator)
            total = cfg.dmp_weight * loss
            out["dmp_loss"], out["dmp_acc"] = loss.detach(), acc
        if cfg.cca_weight > 0 and batch.cca is not None:
            loss, acc = self.cca(batch.cca, batch.cca_targets)
            total = cfg.cca_weight * loss + (total if total is not None else 0)
            out["cca_loss"], out["cca_acc"] = loss.detach(), acc
        if total is not None:
            out["total"] = total
        return out

    def dmp(self, batch: TokenBatch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of domain-adaptive masked prediction on unmasked inputs."""
        bb = self.backbone
        m = mask_keywords(batch.input_ids, batch.keyword_mask, batch.entity_ids > 0,
                          probability=self.cfg.mlm_probability, mask_token_id=bb.mask_token_id,
                          vocab_size=bb.vocab_size, generator=generator)
        # a masked keyword's entity must not reach a KG prompt (unicrs)
        masked = batch.replace(input_ids=m.input_ids, entity_ids=batch.entity_ids.masked_fill(m.selected, 0))
        return masked_lm_loss(bb.encode(masked), m.labels, bb.lm_logits)

    def cca(self, batch: TokenBatch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of contrastive context alignment: rows [0, B) are anchors, [B, 2B)
        their positives."""
        z = self.backbone.context_representation(batch, self.cfg.pooling or None)
        if self.projection is not None and self.training:
            z = self.projection(z)
        anchors, positives = z.chunk(2)
        return info_nce(anchors, positives, self.cfg.temperature, targets, self.cfg.similarity)


def _max_positions(backbone: Any) -> int | None:
    for model in (getattr(backbone, "model", None), getattr(backbone, "decoder", None)):
        cfg = getattr(model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if n:
            return int(n)
    return None


__all__ = ["MODEL_NAME", "LOTCRSPretrainModel"]
