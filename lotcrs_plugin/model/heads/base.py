"""The item-scoring head of the LOT-CRS recommender, and the registry of heads.

A head turns the backbone's states for a batch of contexts into one score per catalog item. It
reads one (B, H) state per context (``read``: the prompt's mask position, the mean over the
context's real tokens, or the first position) and scores items as one linear map of a feature
vector: ``scores = features(state) @ weight.T + bias``. Evaluation uses those three parts to rank
a large catalog in chunks (lotcrs_plugin.evaluator.ranking.rank_linear) without the (B, N) matrix.

Heads are chosen by ``head.type`` (the ``head:`` block, :class:`HeadConfig`). A new head is ONE
module in this package that defines an :class:`ItemHead` subclass decorated with
``@register_head("name")``; the package's modules are imported on the first lookup, and a name
taken twice is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.config_block import typed_values
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.registry import class_registrar, import_part_modules

READS = ("mask", "mean", "cls")
LinearParts = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class HeadConfig:
    """The ``head:`` block.

    type: the head (``verbaliser``: the paper's masked-LM head over the item tokens; ``linear``: a
    fresh linear layer over the items; ``dot``: a projection of the state against item embeddings
    that start as the item tokens' embeddings). read: the state scored (mask | mean | cls; '' = the
    head's own default). lr: the learning rate of the head's own parameters (0: the fine-tuning
    rate, lotcrs.lr). tie: dot only: the item embeddings ARE the backbone's input item-token rows
    (trained at the encoder's rate; an item named in the context and a recommended item share one
    vector), else a copy of them made when the head is built (after pre-training), trained at lr. init_std: linear only: the initial weights' standard deviation.
    """

    type: str = "dot"
    read: str = ""
    lr: float = 0.0
    tie: bool = False
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "HeadConfig":
        cfg = cls(**typed_values(cls, d))
        if cfg.type not in head_names():
            raise UserError(f"head.type: unknown head {cfg.type!r}; known heads: {', '.join(head_names())}")
        if cfg.read not in ("", *READS):
            raise UserError(f"head.read must be one of {', '.join(READS)} (or '' for the head's default), "
                            f"not {cfg.read!r}")
        if cfg.lr < 0:
            raise UserError(f"head.lr must be 0 (the fine-tuning rate) or positive, not {cfg.lr!r}")
        if cfg.init_std <= 0:
            raise UserError(f"head.init_std must be positive, not {cfg.init_std!r}")
        return cfg


class ItemHead(nn.Module):
    """Base class of the item-scoring heads (see the module docstring).

    Subclasses set ``default_read`` and implement :meth:`linear_parts`; ``backbone_parameters``
    lists parameters the head shares with the backbone (they train at the backbone's rate).
    """

    name: ClassVar[str] = ""
    default_read: ClassVar[str] = "mask"

    def __init__(self, backbone: Any, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.read_mode = cfg.read or self.default_read
        # not a submodule: the backbone belongs to the model, the head only borrows it
        self.__dict__["_backbone"] = backbone

    @property
    def backbone(self) -> Any:
        return self.__dict__["_backbone"]

    def rebind(self, backbone: Any) -> None:
        """Use ``backbone`` from now on (the model replaced its backbone, e.g. by the pre-trained one)."""
        self.__dict__["_backbone"] = backbone

    def read(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             mask_positions: torch.Tensor | None) -> torch.Tensor:
        """(B, H) the state this head scores, from the backbone's (B, T, H) states."""
        if self.read_mode == "mask":
            if mask_positions is None or bool((mask_positions < 0).any()):
                raise UserError("head.read: mask needs the prompt with its [MASK] in every input")
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask_positions.to(hidden.device)]
        if self.read_mode == "cls":
            return self.backbone._cls_state(hidden, attention_mask)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def linear_parts(self, state: torch.Tensor) -> LinearParts:
        """(features (B, H'), weight (N, H'), bias (N,) or None): scores = features @ weight.T + bias."""
        raise NotImplementedError

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """(B, N) item scores."""
        return F.linear(*self.linear_parts(state))

    def parts_or_scores(self, state: torch.Tensor) -> tuple["LinearParts | None", "torch.Tensor | None"]:
        """(linear parts, None), or (None, dense (B, N) scores) for a head that is not one linear
        map: ranking uses the parts to score a large catalog in chunks."""
        return self.linear_parts(state), None

    def own_parameters(self) -> list[nn.Parameter]:
        """The head's parameters that are not the backbone's (they train at ``head.lr``)."""
        return list(self.parameters())


# ---- registry --------------------------------------------------------------------------------

_HEADS: dict[str, type[ItemHead]] = {}
_discovered = False


def register_head(name: str) -> Callable[[type[ItemHead]], type[ItemHead]]:
    """Class decorator: make an :class:`ItemHead` subclass available as ``head.type: name``."""
    return class_registrar(_HEADS, "head", ItemHead, name)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import_part_modules(__name__.rpartition(".")[0], Path(__file__).parent, ("base",))


def head_names() -> list[str]:
    _discover()
    return sorted(_HEADS)


def build_head(backbone: Any, cfg: HeadConfig) -> ItemHead:
    """The head ``cfg.type`` over ``backbone`` (whose item tokens must already be added)."""
    _discover()
    cls = _HEADS.get(cfg.type)
    if cls is None:
        raise UserError(f"head.type: unknown head {cfg.type!r}; known heads: {', '.join(sorted(_HEADS))}")
    if not backbone.n_items:
        raise RuntimeError("build_head: the backbone has no item tokens yet")
    return cls(backbone, cfg)
