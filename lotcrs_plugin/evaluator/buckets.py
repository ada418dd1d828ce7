"""How recommended items and test targets spread over popularity buckets (the long-tail report's
``popularity_buckets``; ``crslab compare`` plots it).

Buckets are by the catalog's popularity count (the ``count`` of the ``longtail:`` block) with
upper bounds 0, 1, 2, 4, 8, ... (powers of two up to the largest count): bucket j holds the items
whose count c satisfies bounds[j-1] < c <= bounds[j], i.e. labels "0", "1", "2", "3-4", "5-8", ...
Both tails in use (ReDial nbMentions <= 4, INSPIRED train mentions <= 1) end on a bound.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lotcrs_plugin.evaluator.metrics import RankData


def bucket_bounds(max_count: int) -> np.ndarray:
    """Upper bounds 0, 1, 2, 4, ... up to the first power of two >= ``max_count``."""
    bounds = [0, 1]
    while bounds[-1] < max_count:
        bounds.append(bounds[-1] * 2)
    return np.asarray(bounds, dtype=np.int64)


def bucket_labels(bounds: Sequence[int]) -> list[str]:
    labels, low = [], None
    for b in bounds:
        b = int(b)
        labels.append(str(b) if low is None or low + 1 == b else f"{low + 1}-{b}")
        low = b
    return labels


def bucket_of(counts: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Bucket index of each count (vectorised): the first bound >= count."""
    return np.searchsorted(bounds, np.maximum(np.asarray(counts, dtype=np.int64), 0), side="left")


def popularity_histogram(data: RankData, ks: Sequence[int]) -> dict[str, Any]:
    """Per popularity bucket: catalog items, test targets and top-k list entries at each k.

    {"count_field", "upper_bounds", "labels", "catalog_items": [...], "targets": [...],
    "recommended": {"<k>": [...]}}; targets outside the catalog and list entries that are not
    catalog items (or padding) are left out, so "targets" sums to the samples with a catalog
    target and "recommended"[k] to the catalog entries of all top-k lists.
    """
    catalog = data.catalog
    bounds = bucket_bounds(int(catalog.counts.max(initial=0)))
    n = bounds.size
    item_bucket = bucket_of(catalog.counts, bounds)  # (n_items,)
    inside = data.labels >= 0
    out: dict[str, Any] = {
        "count_field": catalog.count_field,
        "upper_bounds": bounds.tolist(),
        "labels": bucket_labels(bounds),
        "catalog_items": np.bincount(item_bucket, minlength=n).tolist(),
        "targets": np.bincount(item_bucket[data.labels[inside]], minlength=n).tolist(),
        "recommended": {},
    }
    for k in ks:
        if k > data.width:
            continue
        # recommended_counts is per item; weigh each item's bucket by how often it was shown
        out["recommended"][str(k)] = np.bincount(item_bucket, weights=data.recommended_counts(k),
                                                 minlength=n).astype(np.int64).tolist()
    return out
