"""The faiss index of the memory store's keys, built for a :class:`RetrievalConfig` (flat, ivf,
hnsw or ivf_pq), with the automatic cell count and code size of the approximate kinds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from loguru import logger

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError

# faiss warns below 39 training points per IVF cell; fewer cells than that are clamped away
_IVF_POINTS_PER_CELL = 39
# k-means of the ivf_pq cells trains on a seeded sample of this many keys per cell (ivf keeps
# faiss's 256, which makes building over millions of keys take many minutes)
_PQ_TRAIN_PER_CELL = 64


def ivf_cells(nlist: int, n: int, kind: str = "ivf") -> int:
    """The cells for n keys: ``nlist``, else about 4 sqrt(n) (ivf) or 0.75 sqrt(n) (ivf_pq: scanning
    a cell's 4-bit codes is so cheap that comparing each query with every cell centroid dominates,
    so fewer, larger cells are faster at the same recall: at 2M keys 1024 cells beat 2121 and
    5657, benchmarks/results/retrieval_n2000000.md); at most n // 39 (faiss wants 39 training
    points per cell), at least 1."""
    want = nlist or int(round((0.75 if kind == "ivf_pq" else 4.0) * math.sqrt(n)))
    return max(1, min(want, n // _IVF_POINTS_PER_CELL))


def auto_pq_m(d: int) -> int:
    """Sub-vectors of an ivf_pq code: the largest divisor of d up to d / 8 (8 dimensions, 4 bits each)."""
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def _make_index(config: RetrievalConfig, keys: np.ndarray) -> Any:
    import faiss

    n, d = keys.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if config.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.index in ("ivf", "ivf_pq"):
        nlist = ivf_cells(config.nlist, n, config.index)
        if config.nlist and nlist != config.nlist:
            logger.info(f"[retrieval] {config.index}: {n} keys support {nlist} cells, not {config.nlist}")
        if config.index == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
        else:
            m = config.pq_m or auto_pq_m(d)
            if d % m:
                raise UserError(f"retrieval: pq_m {m} must divide the key size {d}; e.g. pq_m: {auto_pq_m(d)}")
            index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, m, 4, ip)
        seed = 1234 if config.sample_seed is None else config.sample_seed
        index.cp.seed = seed
        train = keys
        if config.index == "ivf_pq" and n > _PQ_TRAIN_PER_CELL * nlist:
            rows = np.sort(np.random.default_rng(seed).choice(n, _PQ_TRAIN_PER_CELL * nlist, replace=False))
            train = keys[rows]
        index.train(train)
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, ip)
        index.hnsw.efConstruction = config.ef_construction
    index.add(keys)
    return index
