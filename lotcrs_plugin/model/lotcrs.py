"""The LOT-CRS fine-tuning model (CRSLab model ``LOTCRS``): backbone + retrieval fusion + item head
+ evidence term.

For a batch of contexts ending in the prompt (``... you should watch [MASK]``):

1. the backbone gives every position's state h (``Backbone.encode``);
2. the item head (``head:`` block, lotcrs_plugin.model.heads) reads one state per context: the
   prompt's mask (the paper's verbaliser), the mean over the context, or the first position;
3. with retrieval on and a memory store attached (:attr:`LOTCRSModel.store`), the context's
   representation (the store's key space: ``Backbone.context_representation`` with the configured
   pooling) retrieves the k nearest simulated contexts, whose values are the same read of their
   states; :class:`~lotcrs_plugin.model.fusion.RetrievalFusion` gives LayerNorm(s + w * attention);
4. the head scores the items from the (fused) state, and the evidence term (``evidence:`` block,
   lotcrs_plugin.model.evidence) adds what the whole dialog names: a learned copy term for its
   items and learned matches of its attributes, zero at initialisation.

The store is not a module: the system builds it (keys and values from
:meth:`LOTCRSModel.store_entries`), attaches it, and saves it next to the model.

``backbone_path: builtin:tiny-bert`` makes a demo/test backbone on the spot
(lotcrs_plugin.model.backbones.tiny).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.config_blocks.finetune import BLOCK, FinetuneConfig
from lotcrs_plugin.config_blocks.rerank import RerankConfig
from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.data.context_evidence import EvidenceBatch, ItemAttributes
from lotcrs_plugin.data.item_vocab import ItemVocab
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.evaluator.ranking import Ranking, rank_dense, rank_linear
from lotcrs_plugin.model.backbones import DEFAULT_PROMPT, Backbone, EntityKG, TokenBatch, build_backbone
from lotcrs_plugin.model.backbones.tiny import resolve_backbone_path
from lotcrs_plugin.model.cpu_dropout import use_cpu_dropout
from lotcrs_plugin.model.evidence import EvidenceConfig, EvidenceTerm
from lotcrs_plugin.model.fusion import RetrievalFusion
from lotcrs_plugin.model.heads import HeadConfig, ItemHead, build_head
from lotcrs_plugin.model.knn import KnnVoter, knn_bonus
from lotcrs_plugin.model.sample_rankers import SampleRanker, train_popularity
from lotcrs_plugin.model.retrieval import MemoryStore, RetrievalResult
from lotcrs_plugin.model.tail_slots import NOT_TAIL, merge_tail_slots, slot_mask

MODEL_NAME = "LOTCRS"
# backbones whose encode() output is the last-layer state that their 'cls' / 'mean' pooling reads:
# the query is pooled from it instead of a second forward pass
_POOL_FROM_ENCODE = ("bert", "unicrs")


# ---- the model -------------------------------------------------------------------------------

@dataclass
class ScoreParts:
    """One batch's item scores before the vote's weight (see LOTCRSModel.score_parts)."""

    head: Any                                   # (features, weight, bias) of a linear head, else None
    logits: torch.Tensor | None                 # (B, N) dense scores when the head is not linear
    votes: tuple[torch.Tensor, torch.Tensor] | None  # the vote's (ids, p_knn), (B, k) each
    tail: bool                                  # the vote's tail ranking is wanted (tail slots)


@dataclass
class ModelOutput:
    """logits: (B, N) item scores. query: (B, H) the context representation (None when retrieval
    is off). states: (B, H) the state the head reads, before fusion. retrieved: the memory store's
    neighbours (None when retrieval is off)."""

    logits: torch.Tensor
    query: torch.Tensor | None
    states: torch.Tensor
    retrieved: RetrievalResult | None


def with_tail_slots(ranking: Ranking, tail_top: torch.Tensor, slots: Mapping[int, int] | None,
                    targets: torch.Tensor | None) -> Ranking:
    """The model's ranking with ``slots`` places filled from the vote's tail ranking ``tail_top``
    (model/tail_slots.py); the cross-entropy stays the model's, the scores are not defined (NaN)."""
    if not slots or not any(slots.values()):
        return ranking
    depth = ranking.top_ids.shape[1]
    merged = merge_tail_slots(ranking.top_ids, tail_top, slot_mask(slots, depth))
    rank = ranking.target_rank
    if rank is not None and targets is not None:  # the target's place in the new list; else past it
        hit = merged == targets.to(merged.device).long()[:, None]
        rank = torch.where(hit.any(1), hit.float().argmax(1), torch.clamp(rank, min=depth))
        rank = torch.where(ranking.target_rank >= 0, rank, ranking.target_rank)
    return Ranking(merged, torch.full(merged.shape, float("nan"), device=merged.device), rank,
                   ranking.target_score, ranking.logsumexp)


class LOTCRSModel(nn.Module):
    """Built by CRSLab as ``LOTCRSModel(opt, device, vocab, side_data)`` (see the module docstring).

    Reads ``backbone``, ``backbone_path``, the ``lotcrs:`` block (``retrieval``, ``prompt``,
    ``pooling``), the ``retrieval:`` block (fusion weight and dropout), the ``rerank:`` block (the
    tail ranking's logit weight), the ``head:`` and the ``evidence:`` blocks.
    """

    def __init__(self, opt: Any, device: Any, vocab: Mapping[str, Any], side_data: Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg = FinetuneConfig.from_dict(opt.get(BLOCK, None))
        self.retrieval_cfg = RetrievalConfig.from_dict(opt.get("retrieval", None))
        self.rerank_cfg = RerankConfig.from_dict(opt.get("rerank", None))
        self.head_cfg = HeadConfig.from_dict(opt.get("head", None))
        self.evidence_cfg = EvidenceConfig.from_dict(opt.get("evidence", None))
        name = opt.get("backbone", None)
        path = opt.get("backbone_path", None)
        if not name:
            raise UserError("key 'backbone' is missing; set backbone: bert, bart or unicrs")
        if not path:
            raise UserError("key 'backbone_path' is missing; give a Hugging Face model name, a local folder, "
                            "a pre-trained export or builtin:tiny-bert")
        self.items = ItemVocab.from_side_data(side_data, vocab)
        self.kg = EntityKG.from_side_data(side_data, vocab["n_entity"]) if (side_data or {}).get("entity_kg") else None
        self.backbone_name = name
        self.backbone_path = resolve_backbone_path(name, path, vocab)
        self.backbone = self._prepare(build_backbone(name, self.backbone_path, kg=self.kg, prompt=cfg.prompt))
        hidden = self.backbone.hidden_size
        self.head: ItemHead = build_head(self.backbone, self.head_cfg)
        self.evidence: EvidenceTerm | None = None
        if self.evidence_cfg.enabled:
            cfg_e = self.evidence_cfg
            attributes = (ItemAttributes.from_side_data(side_data, self.items.entity_ids, vocab["n_entity"])
                          if cfg_e.attributes or cfg_e.item_attributes else None)
            self.evidence = EvidenceTerm(cfg_e, len(self.items), hidden, attributes)
        self.fusion = (RetrievalFusion(hidden, self.retrieval_cfg.fusion_weight, self.retrieval_cfg.dropout)
                       if cfg.retrieval else None)
        # keys and queries live in the space CCA pre-training shaped: its pooling unless set here
        pretrain_block = opt.get("lotcrs_pretrain", None) or {}
        self._pooling = cfg.pooling or (pretrain_block.get("pooling") if isinstance(pretrain_block, dict) else "") or ""
        self.store: MemoryStore | None = None  # attached by the system; not part of the state dict
        self.knn: KnnVoter | None = None  # the balanced store's vote at evaluation (model/knn.py); idem
        self.ranker: SampleRanker | None = None  # lotcrs.ranker: a training-free baseline instead of the model
        # the evaluator's tail (N,) bool, for the tail slots of the vote (model/tail_slots.py); set by the
        # system, not part of the state dict
        self.tail_items: torch.Tensor | None = None
        if cfg.ranker != "model":
            self.ranker = SampleRanker(cfg.ranker, train_popularity(self.items.entity_ids,
                                                                    (side_data or {}).get("item_stats")),
                                       self.backbone.first_item_id)

    # -- backbone

    def _prepare(self, backbone: Backbone) -> Backbone:
        """Item tokens for this catalog (a pre-trained export brings its own: they must match), and the
        cheap CPU dropout unless ``cpu_dropout: native``, packed tokens as ``packed_tokens`` says."""
        if backbone.n_items:
            if backbone.item_entity_ids and backbone.item_entity_ids != self.items.entity_ids:
                raise UserError(f"backbone_path {self.backbone_path}: its item tokens belong to another catalog "
                                f"({backbone.n_items} items, this dataset has {len(self.items)})")
        else:
            backbone.add_item_tokens(self.items.display_names, self.items.entity_ids)
        if self.cfg.cpu_dropout == "fast":
            use_cpu_dropout(backbone)
        backbone.pack_tokens = self.cfg.packed_tokens
        return backbone

    def set_backbone(self, backbone: Backbone) -> None:
        """Replace the backbone (e.g. by the pre-trained one); same architecture and vocabulary."""
        backbone = self._prepare(backbone)
        if backbone.vocab_size != self.backbone.vocab_size or backbone.hidden_size != self.backbone.hidden_size:
            raise UserError(f"the pre-trained backbone ({backbone.vocab_size} tokens, hidden {backbone.hidden_size}) "
                            f"does not match backbone_path ({self.backbone.vocab_size} tokens, hidden "
                            f"{self.backbone.hidden_size})")
        device = next(self.backbone.parameters()).device
        self.backbone = backbone.to(device)
        # a fresh head over the new backbone: a dot head's items start from ITS item embeddings
        self.head = build_head(self.backbone, self.head_cfg).to(device)

    def parameter_rates(self) -> dict[int, float]:
        """id(parameter) -> learning rate, for the parameters that do not train at lotcrs.lr: the
        head's own (head.lr, when set) and the evidence term's (evidence.lr)."""
        rates: dict[int, float] = {}
        if self.head_cfg.lr > 0:
            rates.update((id(p), self.head_cfg.lr) for p in self.head.own_parameters())
        if self.evidence is not None:
            rates.update((id(p), self.evidence_cfg.lr) for p in self.evidence.parameters())
        return rates

    @property
    def pooling(self) -> str:
        return self._pooling or self.backbone.default_pooling

    # -- pieces

    def represent(self, batch: TokenBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H) the context representation of the memory store's key space. For bert and unicrs
        with 'cls' / 'mean' pooling it is read from ``hidden`` (their encode() output is the state
        the pooling reads), otherwise the backbone pools in a pass of its own."""
        bb, pooling = self.backbone, self.pooling
        if hidden is None or bb.name not in _POOL_FROM_ENCODE or pooling not in ("cls", "mean"):
            return bb.context_representation(batch, pooling)
        mask = batch.attention_mask
        if pooling == "cls":
            return bb._cls_state(hidden, mask)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def read(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """(B, H) the state the head scores (head.read: the mask, the mean, the first position)."""
        return self.head.read(hidden, batch.attention_mask, batch.mask_positions)

    @torch.no_grad()
    def store_entries(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of memory entries for simulated contexts (target masked): the context
        representation and the state the head reads. Call in eval mode."""
        hidden = self.backbone.encode(batch)
        return self.represent(batch, hidden).float(), self.read(hidden, batch).float()

    def _fused(self, batch: TokenBatch, hidden: torch.Tensor,
               query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, RetrievalResult | None]:
        """(states, fused states, neighbours): the head's read, fused with the store's values."""
        states = self.read(hidden, batch)
        if not self.uses_retrieval:
            return states, states, None
        if query is None:
            query = self.represent(batch, hidden)
        retrieved = self.store.search(query.detach().float())
        fused = self.fusion(states[:, None], retrieved.values.to(states.dtype), value_mask=retrieved.mask)[:, 0]
        return states, fused, retrieved

    def evidence_bonus(self, states: torch.Tensor, evidence: EvidenceBatch | None) -> torch.Tensor | None:
        """(B, N) float32 the evidence term's scores, None when the model has none."""
        if self.evidence is None:
            return None
        if evidence is None:
            raise RuntimeError("LOTCRSModel: the evidence term is on, but the batch carries no evidence "
                               "(build RecData with an EvidenceBuilder)")
        return self.evidence(states, evidence)

    @property
    def uses_retrieval(self) -> bool:
        return self.fusion is not None and self.store is not None

    def forward(self, batch: TokenBatch, *, evidence: EvidenceBatch | None = None,
                need_query: bool = False) -> ModelOutput:
        """Item scores of a batch (see the module docstring); ``evidence``: the batch's (needed
        when the evidence term is on); ``need_query`` computes the query with its graph also
        without retrieval (for the retrieval loss)."""
        hidden = self.backbone.encode(batch)
        query = self.represent(batch, hidden) if (self.uses_retrieval or need_query) else None
        states, fused, retrieved = self._fused(batch, hidden, query)
        logits = self.head(fused)
        bonus = self.evidence_bonus(states, evidence)
        if bonus is not None:
            logits = logits.float() + bonus
        return ModelOutput(logits, query, states, retrieved)

    def rank_items(self, batch: TokenBatch, targets: torch.Tensor | None, k: int,
                   max_elements: int, *, evidence: EvidenceBatch | None = None) -> Ranking:
        """Top-k items, each target's rank and the log-sum-exp of a batch (evaluation, no grad),
        scored in item chunks of at most ``max_elements`` scores
        (lotcrs_plugin.evaluator.ranking): the same fused state as :meth:`forward`, without its
        (B, N) logits; with the vote's tail slots when they are set."""
        ranking, tail_top = self.rank_parts(batch, targets, k, max_elements, evidence=evidence)
        if tail_top is None:
            return ranking
        return with_tail_slots(ranking, tail_top, self.knn.tail_slots, targets)

    def rank_parts(self, batch: TokenBatch, targets: torch.Tensor | None, k: int, max_elements: int,
                   *, tail: bool | None = None,
                   evidence: EvidenceBatch | None = None) -> tuple[Ranking, torch.Tensor | None]:
        """The model's ranking (with the vote's bonus when its weight is > 0) and, when the tail
        slots are on (or ``tail``), the vote's (B, k) tail ranking that fills them."""
        if self.ranker is not None:
            return self.ranker.rank(batch, targets, k, max_elements), None
        return self.rank_scored(self.score_parts(batch, tail=tail, evidence=evidence), targets, k, max_elements)

    def score_parts(self, batch: TokenBatch, *, tail: bool | None = None,
                    evidence: EvidenceBatch | None = None) -> "ScoreParts":
        """What ranking a batch needs, before the vote's weight is applied: the linear head
        (features, weight, bias) or the dense logits (a head that is not linear, or the evidence
        term on), and the vote (when it scores or fills tail slots). The weight and the slots can
        then be tried without running the model again."""
        hidden = self.backbone.encode(batch)
        states, fused, _ = self._fused(batch, hidden)
        head, logits = self.head.parts_or_scores(fused)
        bonus = self.evidence_bonus(states, evidence)
        if bonus is not None:  # the evidence term is dense (B, N): so are the scores
            logits = (F.linear(*head) if logits is None else logits).float() + bonus
            head = None
        if tail is None:
            tail = bool(self.knn is not None and self.knn.tail_slots and any(self.knn.tail_slots.values()))
        tail = bool(tail and self.knn is not None and self.tail_items is not None)
        votes = self.knn.votes(batch) if self.knn is not None and (self.knn.weight > 0 or tail) else None
        return ScoreParts(head, None if logits is None else logits.float(), votes, tail)

    def rank_scored(self, parts: "ScoreParts", targets: torch.Tensor | None, k: int,
                    max_elements: int) -> tuple[Ranking, torch.Tensor | None]:
        """:meth:`rank_parts` from :meth:`score_parts`, with the vote's current weight."""
        head, logits, votes = parts.head, parts.logits, parts.votes
        weight = self.knn.weight if self.knn is not None else 0.0
        bonus = None
        if votes is not None and weight > 0:
            bonus = (votes[0], knn_bonus(votes[1], self.knn.n_items, weight))
        if head is None:  # a head that is not one linear map: rank its dense scores
            ranking = rank_dense(logits, k, targets=targets, max_elements=max_elements, bonus=bonus)
        else:
            ranking = rank_linear(*head, k, targets=targets, max_elements=max_elements, bonus=bonus)
        if not parts.tail:
            return ranking, None
        # the tail ranking: log(1 + N p_knn) + a * logit over tail items (head items pushed below)
        m = min(len(self.items), k)  # enough candidates for every slot after skipping the model's items
        a = self.rerank_cfg.tail_logit_weight
        not_tail = torch.where(self.tail_items.to(ranking.top_ids.device), 0.0, NOT_TAIL)
        vote = (votes[0], knn_bonus(votes[1], self.knn.n_items, 1.0))
        if head is None:
            tail_rank = rank_dense(a * logits + not_tail, m, max_elements=max_elements, bonus=vote)
        else:
            query, w, bias = head
            bias = not_tail if bias is None else a * bias.float() + not_tail
            tail_rank = rank_linear(a * query, w, bias.to(query.dtype), m, max_elements=max_elements, bonus=vote)
        return ranking, tail_rank.top_ids

    def teacher_copy(self) -> "LOTCRSModel":
        """A copy of this model without fusion or store (the label-smoothness teacher)."""
        store, fusion, knn = self.store, self.fusion, self.knn
        self.store, self.fusion, self.knn = None, None, None
        try:
            import copy

            twin = copy.deepcopy(self)
        finally:
            self.store, self.fusion, self.knn = store, fusion, knn
        return twin


__all__ = ["BLOCK", "DEFAULT_PROMPT", "LOTCRSModel", "MODEL_NAME", "ModelOutput", "ScoreParts", "with_tail_slots"]
