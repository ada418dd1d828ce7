"""Threads: for each conversation an ordered list of attributes and related items that leads to
its target item (which comes last, implicitly). Sampled for many conversations at once with numpy.

Element kinds ("slot kinds") are 0 = a related item, 1 + k = attribute kind k of the catalog.
An attribute element is one of the target's attributes of that kind. A related item is found
through one of the target's attributes shared with other items (the "via" attribute, which is
also a natural reason for the recommendation). Elements of a thread are distinct (attributes by
display name); genres come first, as the broadest preference; targets without attributes get
an empty thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lotcrs_plugin.data.catalog import Catalog

ITEM_SLOT = 0


@dataclass
class Threads:
    target: np.ndarray    # (B,) item index
    length: np.ndarray    # (B,) number of elements before the target
    element: np.ndarray   # (B, W) filler ids: item index, or n_items + attribute index; -1 padding
    slot: np.ndarray      # (B, W) slot kind; -1 padding
    via: np.ndarray       # (B, W) attribute linking the element to the target; -1 padding

    def sequence(self, b: int, catalog: Catalog) -> list[tuple[str, str]]:
        """Thread ``b`` as (kind, display name) pairs, the target item last."""
        out = []
        for e, s in zip(self.element[b].tolist(), self.slot[b].tolist()):
            if e < 0:
                break
            if s == ITEM_SLOT:
                out.append(("item", catalog.item_names[e]))
            else:
                out.append((catalog.kinds[s - 1], catalog.attr_names[e - catalog.n_items]))
        out.append(("item", catalog.item_names[int(self.target[b])]))
        return out


class ThreadSampler:
    """Precomputes the catalog's sampling tables once; :meth:`sample` draws threads in bulk."""

    def __init__(self, catalog: Catalog, slot_weights: np.ndarray, via_weights: np.ndarray | None = None) -> None:
        """``slot_weights``: (1 + n_kinds,) weights of the element kinds (0 disables a kind);
        ``via_weights``: (n_kinds,) weights of the attribute kinds linking related items."""
        self.c = catalog
        self.n_items = catalog.n_items
        self.n_kinds = len(catalog.kinds)
        w = np.asarray(slot_weights, dtype=np.float64)
        assert w.shape == (1 + self.n_kinds,)
        self.slot_weights = w
        # related items come through attributes of the weighted kinds; all kinds if none is
        via_w = np.ones(self.n_kinds) if via_weights is None else np.asarray(via_weights, dtype=np.float64)
        self.via_weights = via_w if via_w.sum() > 0 else np.ones(self.n_kinds)
        deg = catalog.attr_degree
        # the target's attributes shared with at least one other item, CSR sorted by kind
        ind = catalog.item_attr_indices
        shared = deg[ind] >= 2 if len(ind) else np.zeros(0, dtype=bool)
        owner = np.repeat(np.arange(self.n_items), np.diff(catalog.item_attr_indptr))
        self.sh_indices = ind[shared]
        sh_owner = owner[shared]
        sh_kind = catalog.attr_kind[self.sh_indices].astype(np.int64)
        kk = max(self.n_kinds, 1)
        counts = np.bincount(sh_owner * kk + sh_kind, minlength=self.n_items * kk).reshape(self.n_items, kk)
        self.sh_counts = counts[:, : self.n_kinds]
        sh_indptr = np.zeros(self.n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(sh_owner, minlength=self.n_items), out=sh_indptr[1:])
        self.sh_start = sh_indptr[:-1, None] + np.concatenate(
            [np.zeros((self.n_items, 1), dtype=np.int64), np.cumsum(self.sh_counts, axis=1)[:, :-1]], axis=1)
        # attributes with the same display name (three DBpedia "drama" entities) count as one
        names: dict[tuple[int, str], int] = {}
        self.attr_group = np.fromiter(
            (names.setdefault((int(k), n.lower()), len(names)) for k, n in zip(catalog.attr_kind, catalog.attr_names)),
            dtype=np.int64, count=catalog.n_attributes)
        genre = catalog.kinds.index("genre") if "genre" in catalog.kinds else -1
        # order of elements in a thread: genres first, the rest in sampled order
        self.slot_rank = np.ones(1 + self.n_kinds, dtype=np.int64)
        if genre >= 0:
            self.slot_rank[1 + genre] = 0

    def sample(self, targets: np.ndarray, rng: np.random.Generator, min_len: int, max_len: int) -> Threads:
        """Threads for ``targets`` with ``min_len``..``max_len`` elements before the target (fewer
        when the target has fewer distinct attributes and related items)."""
        c = self.c
        t = np.asarray(targets, dtype=np.int64)
        b = len(t)
        want = rng.integers(min_len, max_len + 1, size=b)
        draws = max(2 * max_len + 2, 1)  # candidates per thread, duplicates removed afterwards
        if max_len == 0 or self.n_kinds == 0:
            empty = np.full((b, max(max_len, 1)), -1, dtype=np.int64)
            return Threads(t, np.zeros(b, dtype=np.int64), empty, empty.copy(), empty.copy())

        # which element kinds each target offers, weighted by the mix
        kc = c.item_kind_counts[t]                                 # (b, K)
        shc = self.sh_counts[t]                                    # (b, K)
        via_w = self.via_weights[None, :] * (shc > 0)              # (b, K)
        avail = np.concatenate([(via_w.sum(1) > 0)[:, None], kc > 0], axis=1)
        w = self.slot_weights[None, :] * avail                     # (b, 1+K)
        cum = np.cumsum(w, axis=1)
        total = cum[:, -1]
        u = rng.random((b, draws)) * total[:, None]
        slot = (u[:, :, None] >= cum[:, None, :]).sum(2)           # (b, draws)
        slot = np.minimum(slot, self.n_kinds)
        ok = np.broadcast_to(total[:, None] > 0, (b, draws)).copy()

        rows = np.repeat(np.arange(b), draws).reshape(b, draws)
        tt = t[rows]
        u_attr = rng.random((b, draws))
        u_via = rng.random((b, draws))
        u_item = rng.random((b, draws))

        # attribute elements: a uniform attribute of the chosen kind
        kind = np.maximum(slot - 1, 0)
        cnt = kc[rows, kind]
        pos = c.item_kind_start[tt, kind] + np.minimum((u_attr * cnt).astype(np.int64), np.maximum(cnt - 1, 0))
        attr_el = np.where(cnt > 0, c.item_attr_indices[np.minimum(pos, max(len(c.item_attr_indices) - 1, 0))]
                           if len(c.item_attr_indices) else -1, -1)

        # related items: a via kind, a shared attribute of that kind, another item having it
        vcum = np.cumsum(via_w, axis=1)
        vtot = vcum[:, -1]
        vu = u_via * vtot[rows]
        vkind = np.minimum((vu[:, :, None] >= vcum[:, None, :]).sum(2), self.n_kinds - 1)
        vcnt = shc[rows, vkind]
        vpos = self.sh_start[tt, vkind] + np.minimum((u_attr * vcnt).astype(np.int64), np.maximum(vcnt - 1, 0))
        has_sh = len(self.sh_indices) > 0
        via_attr = np.where(vcnt > 0, self.sh_indices[np.minimum(vpos, len(self.sh_indices) - 1)] if has_sh else -1, -1)
        va = np.maximum(via_attr, 0)
        adeg = c.attr_item_indptr[va + 1] - c.attr_item_indptr[va]
        j = np.minimum((u_item * (adeg - 1)).astype(np.int64), np.maximum(adeg - 2, 0))
        base = c.attr_item_indptr[va]
        n_ai = max(len(c.attr_item_indices) - 1, 0)
        item_el = c.attr_item_indices[np.minimum(base + j, n_ai)] if len(c.attr_item_indices) else np.zeros_like(j)
        # the target itself is swapped for the attribute's last item: uniform over the others
        last = c.attr_item_indices[np.minimum(base + adeg - 1, n_ai)] if len(c.attr_item_indices) else item_el
        item_el = np.where(item_el == tt, last, item_el)
        item_ok = (via_attr >= 0) & (adeg >= 2)

        is_item = slot == ITEM_SLOT
        element = np.where(is_item, item_el, self.n_items + attr_el)
        via = np.where(is_item, via_attr, attr_el)
        ok &= np.where(is_item, item_ok, attr_el >= 0)
        # distinct per thread: items by index, attributes by display name
        code = np.where(is_item, item_el, self.n_items + self.attr_group[np.maximum(attr_el, 0)])
        code = np.where(ok, code, -1 - np.arange(draws)[None, :])  # invalid draws never collide
        order = np.argsort(code, axis=1, kind="stable")
        sc = np.take_along_axis(code, order, 1)
        dup_sorted = np.zeros_like(ok)
        dup_sorted[:, 1:] = sc[:, 1:] == sc[:, :-1]
        dup = np.zeros_like(ok)
        np.put_along_axis(dup, order, dup_sorted, 1)
        ok &= ~dup
        # the first `want` valid draws in draw order ...
        n_ok = ok.sum(1)
        length = np.minimum(want, n_ok)
        width = max(max_len, 1)
        first = np.argsort(~ok, axis=1, kind="stable")[:, :width]
        valid = np.arange(width)[None, :] < length[:, None]
        # ... then genres in front (stable: the rest keep their order)
        rank = np.where(valid, self.slot_rank[np.take_along_axis(slot, first, 1)], 2)
        keep = np.take_along_axis(first, np.argsort(rank, axis=1, kind="stable"), 1)
        element = np.where(valid, np.take_along_axis(element, keep, 1), -1)
        slot_out = np.where(valid, np.take_along_axis(slot, keep, 1), -1)
        via_out = np.where(valid, np.take_along_axis(via, keep, 1), -1)
        return Threads(t, length.astype(np.int64), element.astype(np.int64), slot_out.astype(np.int64),
                       via_out.astype(np.int64))
