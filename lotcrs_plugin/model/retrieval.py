"""The memory store of retrieval-augmented fine-tuning (LOT-CRS step 3), on tensors.

Built from the simulated data: one entry per (context, item) with key = the context
representation with the item masked [N, Hk], value = the backbone's hidden state at the mask
[N, Hv], and the entry's item id. Keys go into a faiss inner-product index (``flat``: exact,
the authors' IndexFlatIP; ``ivf`` or ``hnsw``: approximate, for large catalogs;
lotcrs_plugin.model.faiss_index); values stay in a torch tensor, copied once to each device that
queries it, so :meth:`MemoryStore.search` returns them where the query lives. Its settings are
the ``retrieval:`` block (lotcrs_plugin.config_blocks.retrieval).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lotcrs_plugin.config_blocks.rerank import RERANK_KEYS
from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.faiss_index import _make_index

MANIFEST = "manifest.json"
FORMAT = "lotcrs-memory-store"
FORMAT_VERSION = 1


class RetrievalResult(NamedTuple):
    """Neighbours of B queries, best first. A slot with no neighbour (approximate indexes can
    return fewer than k; exclusions can leave too few) has entry -1, item -1, score -inf and a
    zero value; :attr:`mask` marks the filled slots."""

    scores: torch.Tensor   # [B, k] float32, on the query's device
    values: torch.Tensor   # [B, k, Hv] float32, on the query's device
    items: torch.Tensor    # [B, k] int64 item ids
    entries: torch.Tensor  # [B, k] int64 entry ids (row numbers in the arrays given to build)

    @property
    def mask(self) -> torch.Tensor:
        return self.entries >= 0


def _as_numpy(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _select_per_item(items: np.ndarray, max_per_item: int | None, seed: int | None) -> np.ndarray:
    """Row numbers kept: at most ``max_per_item`` per item (first ones, or random with ``seed``),
    in their original order. Vectorised: a stable sort by item and the rank within each run."""
    n = items.shape[0]
    if max_per_item is None:
        return np.arange(n, dtype=np.int64)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(items[order], kind="stable")]
    sorted_items = items[order]
    starts = np.flatnonzero(np.r_[True, sorted_items[1:] != sorted_items[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.arange(n) - run_start
    return np.sort(order[rank < max_per_item]).astype(np.int64)


class MemoryStore:
    """Keys in a faiss index, values and item ids beside them; see the module docstring.

    Build with :meth:`build`, or :meth:`load` a folder written by :meth:`save`.
    """

    def __init__(self, config: RetrievalConfig, index: Any, keys: np.ndarray, values: np.ndarray,
                 items: np.ndarray, entry_ids: np.ndarray):
        self.config = config
        self.index = index
        self.keys = keys            # [N, Hk] float32, normalised when config.normalize
        self.values = values        # [N, Hv] float32
        self.items = items          # [N] int64
        self.entry_ids = entry_ids  # [N] int64: row of the entry in the arrays given to build
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._index_by_item()
        self._apply_search_params()

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def build(cls, keys: Any, values: Any, items: Any, config: RetrievalConfig | None = None) -> "MemoryStore":
        """A store of the rows of ``keys`` [N, Hk], ``values`` [N, Hv], ``items`` [N] (tensors or
        arrays), with at most ``config.max_per_item`` entries per item."""
        config = config or RetrievalConfig()
        keys = _as_numpy(keys, np.float32)
        values = _as_numpy(values, np.float32)
        items = _as_numpy(items, np.int64).reshape(-1)
        if keys.ndim != 2 or values.ndim != 2:
            raise UserError(f"memory store: keys and values must be 2-D [N, H], got {keys.shape} and {values.shape}")
        if not keys.shape[0] == values.shape[0] == items.shape[0]:
            raise UserError(f"memory store: keys, values and items must have the same number of rows, "
                            f"got {keys.shape[0]}, {values.shape[0]} and {items.shape[0]}")
        if keys.shape[0] == 0:
            raise UserError("memory store: no entries to build from; give at least one (key, value, item) row")
        rows = _select_per_item(items, config.max_per_item, config.sample_seed)
        # own copies: the caller's arrays (or tensors sharing memory with them) may change later
        if rows.shape[0] < keys.shape[0]:
            keys, values, items = keys[rows], values[rows], items[rows]
        else:
            keys, values, items = keys.copy(), values.copy(), items.copy()
        return cls._from_arrays(config, keys, values, items, rows)

    @classmethod
    def _from_arrays(cls, config: RetrievalConfig, keys: np.ndarray, values: np.ndarray,
                     items: np.ndarray, entry_ids: np.ndarray) -> "MemoryStore":
        """From arrays the store owns (keys are normalised in place when configured)."""
        # a float64 sum of float32 values cannot overflow: it is finite unless a key is NaN/inf
        if not np.isfinite(keys.sum(dtype=np.float64)):
            raise UserError("memory store: keys contain NaN or infinite values; check the encoder output")
        if config.normalize:
            _normalize(keys)
        return cls(config, _make_index(config, keys), keys, values, items, entry_ids)

    def refresh(self, keys: Any, values: Any, items: Any | None = None) -> None:
        """Rebuild from new keys and values (e.g. after the encoder changed).

        Without ``items``: one row per current entry, in the store's order (``self.entry_ids``
        gives their original rows). With ``items``: a full rebuild as :meth:`build` does.
        """
        if items is not None:
            fresh = MemoryStore.build(keys, values, items, self.config)
        else:
            keys = _as_numpy(keys, np.float32)
            values = _as_numpy(values, np.float32)
            if keys.ndim != 2 or values.ndim != 2 or keys.shape[0] != len(self) or values.shape[0] != len(self):
                raise UserError(f"memory store refresh: keys and values must have one row per entry "
                                f"({len(self)}), got {keys.shape} and {values.shape}; pass items to rebuild")
            fresh = MemoryStore._from_arrays(self.config, keys.copy(), values.copy(), self.items, self.entry_ids)
        self.__dict__.update(fresh.__dict__)

    def _index_by_item(self) -> None:
        """Entries grouped by item (for positives of the retrieval loss and exclusions)."""
        self.item_order = np.argsort(self.items, kind="stable")
        self.unique_items, self.item_start, self.item_count = np.unique(
            self.items[self.item_order], return_index=True, return_counts=True)
        self.max_item_count = int(self.item_count.max())

    def _apply_search_params(self) -> None:
        import faiss

        if self.config.index in ("ivf", "ivf_pq"):
            faiss.extract_index_ivf(self.index).nprobe = min(self.config.nprobe, self.index.nlist)
        elif self.config.index == "hnsw":
            self.index.hnsw.efSearch = max(self.config.ef_search, self.config.top_k)

    def describe(self) -> str:
        """The index and its parameters in words (logs, benchmarks)."""
        import faiss

        c = self.config
        if c.index in ("ivf", "ivf_pq"):
            ivf = faiss.extract_index_ivf(self.index)
            text = f"{c.index}: nlist {ivf.nlist}, nprobe {ivf.nprobe}"
            if c.index == "ivf_pq":
                text += f", PQ {faiss.downcast_index(self.index).pq.M}x4 bit, refine x{c.refine_factor}"
            return text
        if c.index == "hnsw":
            return f"hnsw: M {c.hnsw_m}, efConstruction {c.ef_construction}, efSearch {self.index.hnsw.efSearch}"
        return "flat (exact)"

    def _index_search(self, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [B, depth] of the index; ivf_pq takes refine_factor x depth
        candidates by their compressed codes and keeps the best by their exact score."""
        if self.config.index != "ivf_pq":
            return self.index.search(q, depth)
        wide = min(len(self), depth * self.config.refine_factor)
        _, pos = self.index.search(q, wide)
        # numpy, one thread: faiss's fvec_inner_products_by_idx is 10-40x slower with two OpenMP
        # threads on a busy machine
        exact = np.einsum("bkh,bh->bk", self.keys[np.maximum(pos, 0)], q)
        exact[pos < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :depth]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(pos, order, 1)

    def set_search_params(self, **changes: Any) -> None:
        """Change top_k, nprobe, ef_search or refine_factor of a built or loaded store."""
        allowed = ("top_k", "nprobe", "ef_search", "exclude_same_item", "refine_factor")
        bad = [k for k in changes if k not in allowed]
        if bad:
            raise UserError(f"memory store: cannot change {', '.join(bad)} after building; "
                            f"changeable: {', '.join(allowed)}")
        RetrievalConfig.from_dict(changes)  # validates the values
        self.config = replace(self.config, **changes)
        self._apply_search_params()

    # ---- properties -----------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @property
    def key_dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def value_dim(self) -> int:
        return int(self.values.shape[1])

    def tensor(self, name: str, device: torch.device | str) -> torch.Tensor:
        """``keys``, ``values`` or ``items`` as a tensor on ``device``, copied once per device."""
        device = torch.device(device)
        key = (name, str(device))
        cached = self._device_cache.get(key)
        if cached is None:
            cached = torch.from_numpy(getattr(self, name)).to(device)
            self._device_cache[key] = cached
        return cached

    # ---- search ---------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int | None = None, *,
               exclude_items: torch.Tensor | None = None,
               exclude_entries: torch.Tensor | None = None) -> RetrievalResult:
        """The k nearest entries of each query [B, Hk], in one batched faiss call.

        exclude_items [B]: drop entries of this item for that query (-1: none).
        exclude_entries [B] or [B, m]: drop these entry ids (rows given to build; -1: none),
        e.g. the sample itself when the store holds the training data.
        """
        k = self.config.top_k if k is None else int(k)
        if len(self) == 0:
            raise UserError("memory store is empty; build it from at least one entry")
        if k <= 0 or k > len(self):
            raise UserError(f"memory store: top_k={k} but the store has {len(self)} entries; "
                            f"use 1 <= top_k <= {len(self)}")
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise UserError(f"memory store: queries must be [B, {self.key_dim}] (the key size), "
                            f"got {list(queries.shape)}")
        device = queries.device
        q = _as_numpy(queries, np.float32)
        if self.config.normalize:
            q = q.copy()  # the array may share memory with the caller's tensor
            _normalize(q)
        b = q.shape[0]
        ex_items = None if exclude_items is None else _as_numpy(exclude_items, np.int64).reshape(b)
        ex_entries = None
        if exclude_entries is not None:
            ex_entries = _as_numpy(exclude_entries, np.int64).reshape(b, -1)
        # search deep enough that k remain after the exclusions
        extra = (self.max_item_count if ex_items is not None else 0) + (
            ex_entries.shape[1] if ex_entries is not None else 0)
        depth = min(len(self), k + extra)
        scores, pos = self._index_search(q, depth)
        valid = pos >= 0
        safe = np.where(valid, pos, 0)
        if ex_items is not None:
            valid &= self.items[safe] != ex_items[:, None]
        if ex_entries is not None:
            valid &= ~(self.entry_ids[safe][:, :, None] == ex_entries[:, None, :]).any(-1)
        if extra or not valid.all():
            # keep the first k valid slots per row, in score order (stable sort on "invalid")
            take = np.argsort(~valid, axis=1, kind="stable")[:, :k]
            pos = np.take_along_axis(pos, take, 1)
            scores = np.take_along_axis(scores, take, 1)
            valid = np.take_along_axis(valid, take, 1)
        else:
            pos, scores = pos[:, :k], scores[:, :k]
        pos = np.where(valid, pos, -1)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        safe = np.where(valid, pos, 0)
        items = np.where(valid, self.items[safe], -1)
        entries = np.where(valid, self.entry_ids[safe], -1)
        all_valid = bool(valid.all())
        if device.type == "cpu":
            # numpy's gather is single-threaded and several times faster than torch's on a busy CPU
            gathered = self.values[safe]
            if not all_valid:
                gathered[~valid] = 0.0
            values = torch.from_numpy(gathered)
        else:
            values = self.tensor("values", device)[torch.from_numpy(safe).to(device)]
            if not all_valid:
                values = values * torch.from_numpy(valid).to(device).unsqueeze(-1)
        return RetrievalResult(torch.from_numpy(scores).to(device), values,
                               torch.from_numpy(items).to(device), torch.from_numpy(entries).to(device))

    def entries_of_items(self, items: torch.Tensor, n: int, *,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` store positions of each item [B]: positions [B, n] and a valid mask [B, n].

        An item with more than n entries gives n consecutive ones (cyclically) from a random start.
        """
        device = items.device
        it = items.detach().cpu().numpy().astype(np.int64)
        g = np.searchsorted(self.unique_items, it)
        g = np.minimum(g, self.unique_items.shape[0] - 1)
        found = self.unique_items[g] == it
        start = torch.from_numpy(self.item_start[g])
        count = torch.from_numpy(np.where(found, self.item_count[g], 0))
        offset = (torch.rand(it.shape[0], generator=generator) * count).long()
        j = torch.arange(n)
        slot = (offset[:, None] + j[None, :]) % count.clamp(min=1)[:, None]
        order = torch.from_numpy(self.item_order)
        positions = order[start[:, None] + slot]
        valid = j[None, :] < count[:, None]
        return positions.to(device), valid.to(device)

    # ---- files ----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write index.faiss, keys/values/items/entry_ids .npy and manifest.json (written last,
        so a folder with a manifest is complete)."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        for name in ("keys", "values", "items", "entry_ids"):
            np.save(folder / f"{name}.npy", getattr(self, name))
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "n_entries": len(self),
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "n_items": int(self.unique_items.shape[0]),
            "faiss_version": faiss.__version__,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "MemoryStore":
        """A store written by :meth:`save`; UserError names a missing or inconsistent file."""
        import faiss

        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(f"memory store: {path} not found; give a folder written by MemoryStore.save")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise UserError(f"{path}: not a memory store of format {FORMAT} version {FORMAT_VERSION}")
        try:
            # a store saved before the rerank: block existed holds its keys (as defaults or the vote's)
            config = RetrievalConfig.from_dict({k: v for k, v in manifest["config"].items() if k not in RERANK_KEYS})
        except UserError as err:
            raise UserError(f"{path}: config: {err}") from None
        arrays = {}
        for name in ("keys", "values", "items", "entry_ids"):
            f = folder / f"{name}.npy"
            if not f.is_file():
                raise UserError(f"memory store: {f} not found; the folder is incomplete, save it again")
            arrays[name] = np.load(f)
        n = manifest["n_entries"]
        if (arrays["keys"].shape != (n, manifest["key_dim"]) or arrays["values"].shape != (n, manifest["value_dim"])
                or arrays["items"].shape != (n,) or arrays["entry_ids"].shape != (n,)):
            raise UserError(f"{path}: the .npy files do not match the manifest's {n} entries; save the store again")
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.ntotal != n or index.d != manifest["key_dim"]:
            raise UserError(f"{folder / 'index.faiss'}: holds {index.ntotal} vectors of size {index.d}, "
                            f"the manifest says {n} of size {manifest['key_dim']}")
        return cls(config, index, arrays["keys"], arrays["values"], arrays["items"], arrays["entry_ids"])


def _normalize(x: np.ndarray) -> None:
    """L2-normalise rows in place (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
