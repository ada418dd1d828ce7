"""Build time, search throughput and recall of the memory store (lotcrs_plugin.model.retrieval)
with the flat, IVF, HNSW and IVF-PQ (fast-scan codes + exact re-scoring) indexes.

Data shaped like a LOT-CRS store: N keys of size H, ``--per-item`` entries per item (the
authors keep 10), each key its item's random unit direction plus noise; cosine similarity
(``normalize: true``). Queries are fresh noisy samples of random items (not in the store).
Each index is built once through MemoryStore.build (copy, normalisation, IVF training, adding)
and searched through MemoryStore.search (faiss search + gathering the values onto the query's
device) in batches of ``--batch``; the faiss call alone is timed too. recall@k is the overlap
with the exact (flat) neighbours; item@1 is the share of queries whose first neighbour has the
query's item. ``--nprobe 8,16,32`` sweeps the cells searched (ivf, ivf_pq: one build, a row
each); ``--flat-queries 512`` runs the exact search on the first 512 queries only (flat over
millions of keys is slow) and every recall is measured on those.

    python benchmarks/bench_retrieval.py [--n 100000] [--dim 384] [--batch 256] [--k 10]
        [--indexes flat,ivf,hnsw] [--queries 2560] [--out benchmarks/results/retrieval.md]

For the large-catalog question: ``--n 2000000 --indexes flat,ivf,ivf_pq --flat-queries 512
--nprobe 8,16,32,64`` (about 3 GiB per [N, 384] float32 array; the store holds its keys, its
values and, ivf, the index's copy; ``--value-dim 1`` saves the values).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]


def make_data(n: int, dim: int, per_item: int, n_queries: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_items = max(1, n // per_item)
    centers = rng.standard_normal((n_items, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    items = np.arange(n, dtype=np.int64) % n_items
    keys = np.empty((n, dim), dtype=np.float32)
    step = 1 << 16  # in chunks: the noise of 2M x 384 at once would double the memory
    for s in range(0, n, step):
        e = min(n, s + step)
        keys[s:e] = centers[items[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    q_items = rng.integers(0, n_items, n_queries)
    queries = centers[q_items] + rng.standard_normal((n_queries, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    return keys, items, queries.astype(np.float32), q_items


def main() -> None:
    sys.path.insert(0, str(REPO))
    from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
    from lotcrs_plugin.model.retrieval import MemoryStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="entries in the store")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--value-dim", type=int, default=None, help="size of the values (default: --dim)")
    parser.add_argument("--per-item", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2560, help="queries timed per index (whole batches)")
    parser.add_argument("--indexes", default="flat,ivf,hnsw")
    parser.add_argument("--nlist", type=int, default=0,
                        help="IVF cells (default 0: about 4 sqrt(N), clamped to N // 39)")
    defaults = RetrievalConfig()
    parser.add_argument("--nprobe", default=str(defaults.nprobe), help="cells searched; a comma list sweeps them")
    parser.add_argument("--pq-m", type=int, default=defaults.pq_m, help="ivf_pq sub-vectors (0: automatic)")
    parser.add_argument("--refine-factor", default=str(defaults.refine_factor),
                        help="ivf_pq candidates re-scored per result; a comma list sweeps them")
    parser.add_argument("--flat-queries", type=int, default=0,
                        help="exact search (and every recall) on the first this many queries only (0: all)")
    parser.add_argument("--hnsw-m", type=int, default=defaults.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=defaults.ef_construction)
    parser.add_argument("--ef-search", type=int, default=defaults.ef_search)
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit item direction")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/retrieval.md, retrieval_n<N>.md for other N)")
    args = parser.parse_args()
    import faiss
    import torch

    nprobes = [int(v) for v in str(args.nprobe).split(",") if v]
    refines = [int(v) for v in str(args.refine_factor).split(",") if v]
    n_batches = max(1, args.queries // args.batch)
    print(f"data: {args.n} x {args.dim} ...", file=sys.stderr, flush=True)
    keys, items, queries, q_items = make_data(args.n, args.dim, args.per_item, n_batches * args.batch, args.noise)
    values = keys if (args.value_dim or args.dim) == args.dim else np.zeros((args.n, args.value_dim), np.float32)
    q_batches = [torch.from_numpy(queries[i * args.batch:(i + 1) * args.batch]) for i in range(n_batches)]
    qn = queries[: n_batches * args.batch].copy()
    faiss.normalize_L2(qn)
    n_ref = min(args.flat_queries or len(qn), len(qn))

    rows, exact = [], None

    def measure(kind: str, store: MemoryStore, build_s: float, batches: list) -> None:
        nonlocal exact
        store.search(batches[0])  # warm-up (threads, caches)
        # the two timings interleave batch by batch, so that the load of other jobs hits both alike
        results, search_s, faiss_s = [], 0.0, 0.0
        for i, q in enumerate(batches):
            start = time.perf_counter()
            results.append(store.search(q))
            search_s += time.perf_counter() - start
            start = time.perf_counter()
            store.index.search(qn[i * args.batch:(i + 1) * args.batch], args.k)
            faiss_s += time.perf_counter() - start
        n_q = len(batches) * args.batch
        entries = torch.cat([r.entries for r in results]).numpy()
        top_items = torch.cat([r.items[:, 0] for r in results]).numpy()
        if kind == "flat":
            exact = entries[:n_ref]
        recall = None
        if exact is not None:
            recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(entries[:n_ref], exact)]))
        rows.append({
            "index": kind, "build_s": build_s, "qps": n_q / search_s, "faiss_qps": n_q / faiss_s,
            "ms_per_batch": 1000 * search_s / len(batches), "recall": recall, "queries": n_q,
            "item1": float(np.mean(top_items == q_items[: len(top_items)])), "params": store.describe(),
        })
        print(rows[-1], file=sys.stderr, flush=True)

    for kind in [s for s in args.indexes.split(",") if s]:
        config = RetrievalConfig(index=kind, top_k=args.k, normalize=True, max_per_item=None, nlist=args.nlist,
                                 nprobe=nprobes[0], hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                                 ef_search=args.ef_search, pq_m=args.pq_m, refine_factor=refines[0])
        print(f"building {kind} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        store = MemoryStore.build(keys, values, items, config)
        build_s = time.perf_counter() - start
        if kind == "flat":  # exact search over millions of keys is slow: only the reference queries
            measure(kind, store, build_s, q_batches[: max(1, -(-n_ref // args.batch))])
        else:
            for nprobe in (nprobes if kind in ("ivf", "ivf_pq") else nprobes[:1]):
                for refine in (refines if kind == "ivf_pq" else refines[:1]):
                    store.set_search_params(nprobe=nprobe, refine_factor=refine)
                    measure(kind, store, build_s, q_batches)
        del store

    cmd = "python benchmarks/bench_retrieval.py" + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("n", "dim", "value_dim", "per_item", "batch", "k", "queries", "indexes", "nlist", "nprobe",
                     "pq_m", "refine_factor", "hnsw_m", "ef_construction", "ef_search", "noise", "flat_queries")
        if getattr(args, name) != parser.get_default(name))
    out = args.out or REPO / "benchmarks" / "results" / (
        "retrieval.md" if args.n == 100_000 else f"retrieval_n{args.n}.md")
    lines = [
        f"# Memory store: build time and search throughput (N = {args.n:,}, H = {args.dim})", "",
        f"Command: `{cmd}`  ",
        f"Device: {cpu_name()}, {os.cpu_count()} cores (faiss uses {faiss.omp_get_max_threads()} threads), "
        f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end); faiss-cpu {faiss.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()}.  ",
        f"Data: {args.n:,} keys, {args.per_item} per item ({args.n // args.per_item:,} items), unit item direction "
        f"+ noise of norm {args.noise:g}, cosine (normalize: true); {n_batches * args.batch} fresh queries in "
        f"batches of {args.batch}, k = {args.k}"
        + (f"; the exact (flat) search runs on the first {n_ref} queries only, and every recall is measured on "
           f"those" if n_ref < len(qn) else "") + ".", "",
        "| index | parameters | build s | queries/s (MemoryStore.search) | queries/s (faiss only) "
        "| ms per batch | recall@k vs flat | item@1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        recall = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(f"| {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['qps']:,.0f} | {r['faiss_qps']:,.0f} "
                     f"| {r['ms_per_batch']:.1f} | {recall} | {r['item1']:.3f} |")
    lines += ["", "Build = MemoryStore.build (copy + L2 normalisation + IVF k-means training + adding; rows of one "
              "index share its build). "
              "MemoryStore.search includes query normalisation, exclusion bookkeeping and gathering the values "
              "[B, k, H] as a tensor; for ivf_pq also the exact re-scoring of refine_factor x k candidates "
              "(faiss only: the compressed codes' top k, not re-scored). Timings on a shared 2-core machine vary by some 10-30% between runs.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
