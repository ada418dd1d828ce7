"""The ``retrieval:`` block (:class:`RetrievalConfig`): the memory store of lotcrs_plugin.model.retrieval,
and the fusion and retrieval-loss settings that lotcrs_plugin.model.fusion uses; the kNN vote and the
tail slots (beyond the paper) have their own block, ``rerank:`` (lotcrs_plugin.config_blocks.rerank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lotcrs_plugin.config_block import (Check, finite_non_negative, integer, number, one_of, positive_int,
                                        positive_number, typed_values)
from lotcrs_plugin.config_blocks.rerank import RERANK_KEYS
from lotcrs_plugin.errors import UserError

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivf_pq")


@dataclass(frozen=True)
class RetrievalConfig:
    """The ``retrieval:`` block: memory store, fusion and retrieval loss.

    Store:
      index:           flat (exact inner product, faiss IndexFlatIP), ivf (IndexIVFFlat, keys
                       clustered into ``nlist`` cells, ``nprobe`` searched), hnsw
                       (IndexHNSWFlat, graph with ``hnsw_m`` links, ``ef_search`` beam) or
                       ivf_pq (for millions of keys: IndexIVFPQFastScan, the cells hold 4-bit
                       product-quantised codes scanned with SIMD; the best
                       ``refine_factor`` x k candidates are re-scored exactly against the keys).
      top_k:           entries retrieved per query.
      normalize:       L2-normalise keys and queries (cosine similarity instead of inner product).
      max_per_item:    keep at most this many entries per item (the authors keep 10); null keeps all.
      sample_seed:     null keeps each item's first entries in input order; an integer draws
                       them at random with this seed.
      nlist, nprobe:   ivf / ivf_pq cells (0: about 4 sqrt(N) for ivf, 0.75 sqrt(N) for ivf_pq,
                       whose cells are cheap to scan; clamped to N // 39 so every cell has
                       training points) and cells searched per query.
      pq_m, refine_factor: ivf_pq sub-vectors per key (0: the largest divisor of the key size
                       up to a eighth of it, 48 for 384) and candidates re-scored per result.
      hnsw_m, ef_construction, ef_search: hnsw links per node, build beam and search beam
                       (raised to top_k when smaller).
      exclude_same_item: while training, drop entries of the sample's own item from its
                       neighbours (for a store built from the data being trained on).
    Fusion (lotcrs_plugin.model.fusion.RetrievalFusion):
      fusion_weight:   w in LayerNorm(h + w * attention); dropout: on the attention output.
    Retrieval loss (lotcrs_plugin.model.fusion.retrieval_contrastive_loss):
      loss_weight:     its weight in the fine-tuning loss (authors: 0.6; 0 turns it off).
      n_pos, n_neg:    keys of the target item (positives) and of other items (negatives) per query.
      temperature:     softmax temperature of the scores.
    """

    index: str = "flat"
    top_k: int = 10
    normalize: bool = False
    max_per_item: int | None = 10
    sample_seed: int | None = None
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    exclude_same_item: bool = False
    pq_m: int = 0
    refine_factor: int = 4
    fusion_weight: float = 1.0
    dropout: float = 0.1
    loss_weight: float = 0.6
    n_pos: int = 4
    n_neg: int = 512
    temperature: float = 0.05

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RetrievalConfig":
        """Validate a ``retrieval:`` block; UserError names an unknown key or a wrong value (a key of
        ``rerank:``, its old place, gets a line naming the new one)."""
        for key in d if isinstance(d, Mapping) else ():
            if key in RERANK_KEYS:
                raise UserError(f"key '{key}' belongs to the rerank: block now (the kNN vote and the tail slots); "
                                f"move it to rerank.{key}")
        return cls(**typed_values(cls, d, CHECKS))


_AUTOMATIC = integer("an integer >= 0 (0: automatic)", lambda v: v >= 0)
CHECKS: dict[str, Check] = {
    "index": one_of(INDEX_KINDS),
    **dict.fromkeys(("top_k", "nprobe", "hnsw_m", "ef_construction", "ef_search", "n_pos", "n_neg",
                     "refine_factor"), positive_int),
    "nlist": _AUTOMATIC,
    "pq_m": _AUTOMATIC,
    "max_per_item": integer("an integer > 0 or null", lambda v: v > 0, null=True),
    "sample_seed": integer("an integer or null", null=True),
    **dict.fromkeys(("fusion_weight", "loss_weight"), number("a number in [0, inf)", finite_non_negative)),
    "dropout": number("a number in [0, 1)", lambda v: 0 <= v < 1),
    "temperature": positive_number,
}
