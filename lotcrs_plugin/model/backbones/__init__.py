"""LOT-CRS backbones: the interface (:mod:`.base`), its inputs (:mod:`.inputs`), the registry
(:mod:`.registry`) and the ones chosen by ``backbone: NAME`` (``bert``, ``bart``, ``unicrs``; each
module of this package registers its own).

    from lotcrs_plugin.model.backbones import build_backbone
    backbone = build_backbone("bert", "~/.cache/lotcrs/models/all-MiniLM-L6-v2")
    backbone.add_item_tokens(item_names)
"""

from lotcrs_plugin.model.backbones.base import DEFAULT_PROMPT, ITEM_TOKEN, POOLINGS, Backbone
from lotcrs_plugin.model.backbones.inputs import EntityKG, InputFormat, TokenBatch
from lotcrs_plugin.model.backbones.registry import (
    backbone_class, backbone_names, build_backbone, load_backbone, register_backbone,
)

__all__ = ["DEFAULT_PROMPT", "ITEM_TOKEN", "POOLINGS", "Backbone", "EntityKG", "InputFormat", "TokenBatch",
           "backbone_class", "backbone_names", "build_backbone", "load_backbone", "register_backbone"]
