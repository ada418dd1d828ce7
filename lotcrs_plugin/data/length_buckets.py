"""Length-bucketed training batches: less padding, the order still random.

A batch is padded to its longest row, so a batch that mixes a 20-token context with a 128-token
one computes 108 positions for nothing. :func:`bucketed_order` takes an epoch's shuffled order and
regroups it: consecutive pools of ``pool`` batches are sorted by length and cut into batches (rows
of similar length share a batch), then the full batches are shuffled again (the short ones do not
all come first). Every row still comes once per epoch, each batch still draws from a random part
of the data, and the result is a pure function of its inputs (the caller's generator is seeded
by seed and epoch), so a resumed epoch sees the same batches.

``pool`` = 0 or 1 turns it off (the order as given). Larger pools cut more padding and make the
batches more alike in length (a batch of only long rows, one of only short ones); the default of
the systems comes from a measurement (benchmarks/results/speed_cpu.md).
"""

from __future__ import annotations

import numpy as np


def bucketed_order(order: np.ndarray, lengths: np.ndarray, batch_size: int, pool: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``order`` regrouped by length (see the module docstring): batch b is rows
    ``out[b * batch_size:(b + 1) * batch_size]``; the one short batch, if any, stays last.

    order: (n,) row indices (a permutation); lengths: per row index, its length; rng: shuffles the
    full batches (not used when pool < 2)."""
    order = np.asarray(order, dtype=np.int64)
    if pool < 2 or len(order) <= batch_size:
        return order
    lengths = np.asarray(lengths)
    span = pool * batch_size
    pieces = []
    for lo in range(0, len(order), span):
        part = order[lo:lo + span]
        pieces.append(part[np.argsort(lengths[part], kind="stable")])
    grouped = np.concatenate(pieces)
    n_full = len(grouped) // batch_size
    full = grouped[:n_full * batch_size].reshape(n_full, batch_size)
    rest = grouped[n_full * batch_size:]
    return np.concatenate([full[rng.permutation(n_full)].reshape(-1), rest])


def padded_positions(order: np.ndarray, lengths: np.ndarray, batch_size: int, multiple: int = 1) -> tuple[int, int]:
    """(positions computed, real tokens) of the batches of ``order``, each padded to its longest
    row rounded up to ``multiple``: their quotient is the padding overhead."""
    lengths = np.asarray(lengths)
    computed = real = 0
    for lo in range(0, len(order), batch_size):
        rows = lengths[order[lo:lo + batch_size]]
        width = -(-int(rows.max()) // multiple) * multiple
        computed += width * len(rows)
        real += int(rows.sum())
    return computed, real


__all__ = ["bucketed_order", "padded_positions"]
