"""Length-bucketed batches: every row once, less padding, the order random and a pure function
of seed and epoch; the systems' samplers with the knob off give the batches they gave before."""

from __future__ import annotations

import numpy as np

from lotcrs_plugin.data.finetune_samples import IndexBatches
from lotcrs_plugin.data.length_buckets import bucketed_order, padded_positions
from lotcrs_plugin.data.pretrain_samples import CCAIndex, PretrainBatchSampler

LENGTHS = np.random.default_rng(0).integers(10, 129, size=1003)  # a last short batch of 1003 % 16 = 11 rows


def order_of(batches: IndexBatches) -> list[list[int]]:
    return [b.tolist() for [b] in batches]


def test_bucketed_order_is_a_shuffled_permutation_with_less_padding():
    perm = np.random.default_rng([1, 0]).permutation(len(LENGTHS))
    out = bucketed_order(perm, LENGTHS, 16, 20, np.random.default_rng(5))
    assert sorted(out.tolist()) == list(range(len(LENGTHS)))  # every row once
    assert np.array_equal(out, bucketed_order(perm, LENGTHS, 16, 20, np.random.default_rng(5)))  # pure
    plain, real = padded_positions(perm, LENGTHS, 16, 8)
    bucketed, real_b = padded_positions(out, LENGTHS, 16, 8)
    assert real == real_b == int(LENGTHS.sum())
    assert bucketed < 0.8 * plain, (bucketed, plain)  # most of the padding is gone
    assert bucketed / real < 1.1
    # the batches come in random order of length (not long after short), the short batch last
    widths = [int(LENGTHS[out[i:i + 16]].max()) for i in range(0, len(out) - 16, 16)]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    assert len(out) % 16 == 11 and set(out[-11:].tolist()) <= set(perm[-(len(perm) % 320):].tolist())
    # each batch holds rows of one pool: random rows, not the globally shortest together
    first_pool = set(perm[:320].tolist())
    assert sum(set(out[i:i + 16].tolist()) <= first_pool for i in range(0, 16 * 62, 16)) == 20
    for off in (0, 1):  # off: the order as given
        assert np.array_equal(bucketed_order(perm, LENGTHS, 16, off, np.random.default_rng(5)), perm)


def test_index_batches_bucketed_by_seed_and_epoch_and_resumable():
    def batches(epoch=0, start=0, pool=20, seed=3):
        return IndexBatches(len(LENGTHS), 16, seed=seed, epoch=epoch, lengths=LENGTHS, start=start, bucket_pool=pool)

    full = order_of(batches())
    assert order_of(batches()) == full and order_of(batches(start=7)) == full[7:]
    assert order_of(batches(epoch=1)) != full and order_of(batches(seed=4)) != full
    assert sorted(i for b in full for i in b) == list(range(len(LENGTHS)))
    # off: exactly the permutation of (seed, epoch) that IndexBatches always drew
    perm = np.random.default_rng([3, 0]).permutation(len(LENGTHS))
    assert order_of(batches(pool=0)) == [perm[i:i + 16].tolist() for i in range(0, len(perm), 16)]
    assert np.array_equal(IndexBatches(len(LENGTHS), 16, seed=3, epoch=0, bucket_pool=20).order, perm)  # no lengths
    flat = np.concatenate([np.array(b) for b in full])
    assert padded_positions(flat, LENGTHS, 16, 8)[0] < 0.8 * padded_positions(perm, LENGTHS, 16, 8)[0]
    # evaluation batches (no shuffle) stay sorted by length, whatever the pool
    evaluation = IndexBatches(len(LENGTHS), 16, shuffle=False, lengths=LENGTHS, bucket_pool=20)
    assert np.array_equal(evaluation.order, np.argsort(LENGTHS, kind="stable"))


def cca_of(targets: np.ndarray) -> CCAIndex:
    """A CCAIndex of one-turn contexts with these targets (grouped as cca_index groups them)."""
    order = np.argsort(targets, kind="stable")
    uniq, starts = np.unique(targets[order], return_index=True)
    offsets = np.concatenate([starts, [len(targets)]]).astype(np.int64)
    sizes = np.diff(offsets)
    group_of, position = np.empty(len(targets), np.int64), np.empty(len(targets), np.int64)
    group_of[order] = np.repeat(np.arange(len(uniq)), sizes)
    position[order] = np.arange(len(targets)) - np.repeat(offsets[:-1], sizes)
    contexts = np.stack([np.arange(len(targets)), np.arange(len(targets)) + 1], 1)
    return CCAIndex(contexts, targets, order.astype(np.int64), offsets, group_of, position)


def test_pretrain_sampler_buckets_dmp_samples_and_cca_pairs():
    rng = np.random.default_rng(2)
    n_ctx = 400
    targets = np.repeat(np.arange(100), 4)  # four contexts per target
    cca = cca_of(targets)
    dmp_len, cca_len = rng.integers(10, 129, size=500), rng.integers(10, 129, size=n_ctx)

    def specs(pool, epoch=0, start=0):
        s = PretrainBatchSampler(500, cca, 16, 16, seed=1, epoch=epoch, start=start, bucket_pool=pool,
                                 dmp_lengths=dmp_len, cca_lengths=cca_len)
        return [(spec.dmp, spec.cca) for [spec] in s]

    plain, bucketed = specs(0), specs(10)
    assert len(plain) == len(bucketed) == 32
    assert specs(10, start=5) and [d.tolist() for d, _ in specs(10, start=5)] == [d.tolist() for d, _ in bucketed[5:]]
    assert [d.tolist() for d, _ in specs(10, epoch=1)] != [d.tolist() for d, _ in bucketed]
    assert sorted(np.concatenate([d for d, _ in bucketed]).tolist()) == list(range(500))
    for _, pairs in bucketed:
        a, p = pairs[:, 0], pairs[:, 1]
        assert (a != p).all() and (cca.targets[a] == cca.targets[p]).all()
    # the same pairs as without buckets, regrouped
    cycle = lambda sp: sorted(map(tuple, np.concatenate([c for _, c in sp[:25]]).tolist()))  # noqa: E731
    assert cycle(bucketed) == cycle(plain)

    def waste(sp, dmp: bool):
        if dmp:
            return padded_positions(np.concatenate([d for d, _ in sp]), dmp_len, 16, 8)[0]
        longer = np.concatenate([np.maximum(cca_len[c[:, 0]], cca_len[c[:, 1]]) for _, c in sp[:25]])
        return padded_positions(np.arange(len(longer)), longer, 16, 8)[0]

    assert waste(bucketed, True) < 0.8 * waste(plain, True)
    assert waste(bucketed, False) < 0.8 * waste(plain, False)
