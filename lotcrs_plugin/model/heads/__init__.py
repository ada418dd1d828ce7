"""Item-scoring heads of the LOT-CRS recommender (``head:`` block): the interface and registry
(:mod:`.base`) and one module per head (``verbaliser``, ``linear``, ``dot``)."""

from lotcrs_plugin.model.heads.base import (
    READS, HeadConfig, ItemHead, build_head, head_names, register_head,
)

__all__ = ["READS", "HeadConfig", "ItemHead", "build_head", "head_names", "register_head"]
