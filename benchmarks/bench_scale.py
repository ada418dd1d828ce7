"""Time and peak memory of each LOT-CRS stage as the catalog grows from 1k to 100k items.

For every catalog size N a fresh process runs, one after the other:

1. dataset: the built-in ``synthetic`` generator (lotcrs_plugin.data.synthetic): N items with
   genres and people, Zipf-shaped mention popularity, its default 3 conversations per item
   (``--conv-per-item``);
2. simulator: the balanced-data simulator (``--per-item`` conversations per item, written);
3. verbaliser: a BERT backbone (default all-MiniLM-L6-v2, hidden 384; ``--backbone tiny``
   builds a random 2-layer BERT with hidden 384 from a config) gets N item tokens, each
   initialised with the mean embedding of its name's tokens;
4. eval: full ranking of ``--queries`` mask states over the N item tokens of the verbaliser
   (lotcrs_plugin.evaluator.ranking, batches of 64, ``--chunk`` scores at most per block: top 50
   and the target's rank); for contrast the dense way (one (64, N) matrix, topk, a count for the
   rank) on the same states. The encoder pass is left out: it does not depend on N;
5. store: the memory store (lotcrs_plugin.model.retrieval) over ``--keys-per-item`` x N keys of
   size 384 (a random direction per item plus noise, as benchmarks/bench_retrieval.py), built with
   ``--index``; then ``--queries`` searches in batches of 64.

Per stage: wall seconds and the process's peak resident memory during the stage (VmHWM, reset
through /proc/self/clear_refs before the stage) and its growth over the RSS at the stage's start.

    python benchmarks/bench_scale.py [--scales 1000,10000,100000] [--per-item 20] [--keys-per-item 10]
        [--queries 512] [--backbone minilm|tiny|PATH] [--index ivf_pq] [--chunk 1048576]
        [--out benchmarks/results/scale.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))
STAGES = ("dataset", "simulator", "verbaliser", "eval (chunked)", "eval (dense)", "store", "store search")


# ---- measuring one stage -----------------------------------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stage:
    """``with Stage(name, out): ...`` records seconds, peak RSS and its growth in ``out``."""

    def __init__(self, name: str, out: dict):
        self.name, self.out = name, out

    def __enter__(self) -> "Stage":
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.rss0 = _status_mb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self.t0
        peak = _status_mb("VmHWM")
        self.out[self.name] = {"s": seconds, "peak_mb": peak, "delta_mb": peak - self.rss0}
        print(f"  {self.name}: {seconds:.2f}s, peak {peak:.0f} MB (+{peak - self.rss0:.0f})", file=sys.stderr,
              flush=True)


def _tiny_bert(folder: Path, hidden: int = 384) -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer (or a small WordPiece one) and hidden 384."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if (MINILM / "vocab.txt").is_file():
        tok = BertTokenizer.from_pretrained(str(MINILM))
    else:
        import string

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, "(", ")",
                 *("##" + c for c in string.ascii_lowercase + string.digits)]
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.save_pretrained(folder)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=6,
                        intermediate_size=4 * hidden)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def child(n: int, args: argparse.Namespace, work: Path) -> dict:
    """All stages for a catalog of n items, in this process; returns the measurements."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lotcrs_plugin.data.simulator import SimulationConfig, load_stats, simulate
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.generator import generate
    from lotcrs_plugin.data.synthetic.words import GENRES, MAX_PEOPLE
    from lotcrs_plugin.evaluator.ranking import rank_linear
    from lotcrs_plugin.model.backbones import build_backbone
    from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
    from lotcrs_plugin.model.retrieval import MemoryStore

    from bench_retrieval import make_data

    torch.set_num_threads(args.threads)
    res: dict = {}
    info: dict = {"items": n}
    cfg = SyntheticConfig(n_items=n, n_conversations=args.conv_per_item * n,
                          n_people=min(MAX_PEOPLE, 2 * n), n_genres=len(GENRES), seed=0)
    folder = work / f"synthetic_{n}"
    with Stage("dataset", res):
        generate(cfg, folder)
    info["conversations"] = cfg.n_conversations
    info["dataset_mb"] = sum(f.stat().st_size for f in folder.iterdir()) / 2**20

    sim_out = work / f"simulated_{n}"
    with Stage("simulator", res):
        simulate(folder, SimulationConfig(per_item=args.per_item), out_dir=sim_out)
    stats = load_stats(sim_out)
    info["simulated_conversations"] = stats["conversations"]
    info["simulated_mb"] = (sim_out / "simulated_data.json").stat().st_size / 2**20
    shutil.rmtree(sim_out)

    item_stats = json.loads((folder / "item_stats.json").read_text(encoding="utf-8"))
    names = [item_stats[str(i)]["name"] for i in range(1, n + 1)]
    path = str(MINILM) if args.backbone == "minilm" else (
        str(_tiny_bert(work / "tiny-bert")) if args.backbone == "tiny" else args.backbone)
    backbone = build_backbone("bert", path)
    with Stage("verbaliser", res):
        backbone.add_item_tokens(names, list(range(1, n + 1)))
    info["vocab"] = backbone.vocab_size
    shutil.rmtree(folder)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.queries, backbone.hidden_size, generator=g)
    targets = torch.randint(0, n, (args.queries,), generator=g)
    torch.set_grad_enabled(False)
    backbone.model.eval()
    chunked = []
    rank_linear(*backbone.item_head(hidden[:64]), 50, targets=targets[:64], max_elements=args.chunk)  # warm-up
    with Stage("eval (chunked)", res):
        for i in range(0, args.queries, 64):
            r = rank_linear(*backbone.item_head(hidden[i:i + 64]), 50, targets=targets[i:i + 64],
                            max_elements=args.chunk)
            chunked.append((r.top_ids, r.target_rank, r.top_scores))
    dense = []
    with Stage("eval (dense)", res):
        for i in range(0, args.queries, 64):
            scores = F.linear(*backbone.item_head(hidden[i:i + 64]))
            top_scores, top = scores.topk(min(50, n), dim=1)
            t = targets[i:i + 64]
            rank = (scores > scores.gather(1, t[:, None])).sum(1)  # no ties in random scores
            dense.append((top, rank, top_scores))
            del scores
    # the two ways agree up to the order of near-ties (scores equal to float rounding, where the
    # blocks' and the full matrix's matrix products may round differently)
    same_lists = sum(int((a[0] == b[0]).all(1).sum()) for a, b in zip(chunked, dense))
    same_ranks = sum(int((a[1] == b[1]).sum()) for a, b in zip(chunked, dense))
    rank_gap = max(int((a[1] - b[1]).abs().max()) for a, b in zip(chunked, dense))
    score_gap = max(float((a[2] - b[2]).abs().max()) for a, b in zip(chunked, dense))
    info["eval_agree"] = (f"{same_lists}/{args.queries} lists, {same_ranks}/{args.queries} ranks (max diff "
                          f"{rank_gap}); top-50 scores within {score_gap:.1e}")
    res["eval (chunked)"]["block"] = min(64, args.chunk) * min(n, args.chunk // 64)
    res["eval (dense)"]["block"] = 64 * n
    m = args.keys_per_item * n
    keys, items, queries, _ = make_data(m, 384, args.keys_per_item, args.queries, 1.0)
    config = RetrievalConfig(index=args.index, top_k=10, normalize=True, max_per_item=None)
    with Stage("store", res):
        store = MemoryStore.build(keys, keys, items, config)
    del keys
    info["store_keys"] = m
    info["store_params"] = store.describe()
    batches = [torch.from_numpy(queries[i:i + 64]) for i in range(0, len(queries), 64)]
    store.search(batches[0])
    with Stage("store search", res):
        for q in batches:
            store.search(q)
    res["store search"]["qps"] = len(queries) / res["store search"]["s"]
    del store

    return {"info": info, "stages": res}


# ---- the report --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1000,10000,100000")
    parser.add_argument("--per-item", type=int, default=20, help="simulated conversations per item")
    parser.add_argument("--conv-per-item", type=int, default=0,
                        help="synthetic (real) conversations per item (0: the generator's default, 3, at least 600)")
    parser.add_argument("--keys-per-item", type=int, default=10)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--backbone", default="minilm" if (MINILM / "config.json").is_file() else "tiny",
                        help="minilm, tiny, or a BERT folder")
    parser.add_argument("--index", default="ivf_pq", help="memory store index (retrieval.index)")
    parser.add_argument("--chunk", type=int, default=1 << 20, help="most scores per block (lotcrs.eval_chunk_elements)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.md")
    parser.add_argument("--child", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args, args.work)))
        return

    scales = [int(s) for s in args.scales.split(",") if s]
    load = os.getloadavg()[0]
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for n in scales:
            print(f"{n} items ...", file=sys.stderr, flush=True)
            work = Path(tmp) / str(n)
            work.mkdir()
            cmd = [sys.executable, __file__, "--child", str(n), "--work", str(work)] + [
                a for name in ("per_item", "conv_per_item", "keys_per_item", "queries", "backbone", "index", "chunk",
                               "threads")
                for a in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
            env = {**os.environ, "LOTCRS_HOME": str(Path(tmp) / "home"), "OMP_NUM_THREADS": str(args.threads)}
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
            if proc.returncode != 0:
                sys.exit(f"{n} items failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - start
            results.append(r)
    total = time.perf_counter() - started

    import faiss
    import torch

    defaults = {"per_item": 20, "conv_per_item": 0, "keys_per_item": 10, "queries": 512, "index": "ivf_pq",
                "chunk": 1 << 20, "threads": 2, "scales": "1000,10000,100000"}
    cmd = "python benchmarks/bench_scale.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    if args.backbone != parser.get_default("backbone"):
        cmd += f" --backbone {args.backbone}"
    head = "| stage | " + " | ".join(f"{r['info']['items']:,} items" for r in results) + " |"
    lines = [
        f"# Scale: each stage from {scales[0]:,} to {scales[-1]:,} catalog items", "",
        f"Command: `{cmd}` ({total / 60:.1f} min in all)  ",
        f"Device: {cpu_name()}, {os.cpu_count()} cores, shared with other jobs (1-min load average {load:.1f} at "
        f"the start, {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__} ({args.threads} threads), "
        f"faiss-cpu {faiss.__version__}, Python {platform.python_version()}.  ",
        f"Each catalog size runs in a fresh process; a cell is `seconds / peak RSS MB (+growth during the stage)`: "
        f"peak = the process's VmHWM, reset before the stage; growth = peak - RSS at the stage's start (earlier "
        f"stages' objects, e.g. the backbone, stay resident).", "",
        head, "| --- |" + " ---: |" * len(results),
    ]
    for stage in STAGES:
        cells = []
        for r in results:
            s = r["stages"][stage]
            extra = f", {s['qps']:,.0f} q/s" if "qps" in s else ""
            cells.append(f"{s['s']:.2f} s / {s['peak_mb']:,.0f} MB (+{s['delta_mb']:,.0f}){extra}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "| size | " + " | ".join(f"{r['info']['items']:,} items" for r in results) + " |",
              "| --- |" + " ---: |" * len(results)]
    rows = [
        ("synthetic conversations (files MB)", lambda i: f"{i['conversations']:,} ({i['dataset_mb']:.0f})"),
        ("simulated conversations (MB)", lambda i: f"{i['simulated_conversations']:,} ({i['simulated_mb']:,.0f})"),
        ("backbone vocabulary with item tokens", lambda i: f"{i['vocab']:,}"),
        ("store keys (384-d, cosine)", lambda i: f"{i['store_keys']:,}"),
        ("store index", lambda i: str(i["store_params"])),
        ("eval: chunked = dense (identical top-50 lists, target ranks)", lambda i: i["eval_agree"]),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r["info"]) for r in results) + " |")
    lines.append("| eval score block, chunked / dense (values) | " + " | ".join(
        f"{r['stages']['eval (chunked)']['block']:,} / {r['stages']['eval (dense)']['block']:,}" for r in results) + " |")
    lines += ["", "Stages: dataset = lotcrs_plugin.data.synthetic.generate (written); simulator = simulate() with "
              f"per_item {args.per_item} (catalog loading, template mining, generation, writing); verbaliser = "
              f"Backbone.add_item_tokens ({args.backbone}: tokenizer growth, embedding resize, mean-of-name "
              f"initialisation); store = MemoryStore.build ({args.index}, normalize: true, {args.keys_per_item} keys "
              f"per item), store search = {args.queries} queries in batches of 64 (k = 10); eval = {args.queries} "
              f"mask states ranked over every item token in batches of 64 (the MLM head transform included).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
