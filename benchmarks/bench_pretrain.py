"""Throughput of LOT-CRS pre-training steps (DMP, CCA, both) and of the sample pipeline.

A step is what LOTCRSPretrainSystem does per micro-batch: forward with keyword masking (DMP, B
sequences) and/or the contrastive pair loss (CCA, B pairs = 2B sequences), backward, gradient
clipping and an AdamW step. Inputs are fixed-shape (B x T, no padding), 15% of positions in
keyword spans, ``--items`` item tokens in the vocabulary.

    # CPU: all-MiniLM-L6-v2 (../shared/models/get-minilm.sh), batch 16, seq 128
    python benchmarks/bench_pretrain.py --out benchmarks/results/pretrain_throughput.md
    # GPU: a BERT-base-sized model from BertConfig() defaults, bf16 autocast, MFU vs --peak
    python benchmarks/bench_pretrain.py --device cuda --arch bert-base --steps 30 --warmup 5

MFU = model FLOPs / step time / peak FLOP/s, the model FLOPs of benchmarks/_common.py
(encoder_train_flops: 6 N per token for the dense encoder weights, 12 L H T per token for
attention, 6 H V per position the MLM head scores; the same function benchmarks/speed.py uses).
The default peak is the GPU's dense bf16 peak by its name (989e12 for an H100 SXM); on CPU no
MFU is printed unless --peak is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name, encoder_dims, encoder_train_flops, mfu, peak_bf16_flops  # noqa: E402
# (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))


def bert_base_folder(folder: Path) -> Path:
    """BertConfig() defaults (12 layers, hidden 768, vocab 30522) with random weights and a
    WordPiece vocabulary of made-up words (the step time does not depend on the words)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    config = BertConfig()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(config.vocab_size - len(vocab))]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    BertModel(config).save_pretrained(folder)
    return folder


def build_model(path: Path, n_items: int, device, max_length: int):
    from lotcrs_plugin.model.pretrain import LOTCRSPretrainModel

    opt = {"backbone": "bert", "backbone_path": str(path), "dataset": "bench",
           "lotcrs_pretrain": {"max_length": max_length}}
    ids = list(range(1, n_items + 1))
    vocab = {"id2entity": {i: f"item {i}" for i in ids}, "n_entity": n_items + 1}
    side = {"item_entity_ids": ids, "item_stats": {i: {"name": f"item {i}"} for i in ids}}
    return LOTCRSPretrainModel(opt, device, vocab, side).to(device)


def make_batch(model, b: int, t: int, device, generator):
    import torch

    from lotcrs_plugin.model.backbones import TokenBatch

    bb = model.backbone
    ids = torch.randint(5, bb.vocab_size, (b, t), generator=generator)
    ids[:, 0] = bb.tokenizer.cls_token_id
    ids[:, -1] = bb.tokenizer.sep_token_id
    starts = torch.rand(b, t, generator=generator) < 0.075  # spans of 2 tokens: ~15% keywords
    starts[:, 0] = starts[:, -2:] = False
    keyword = starts.clone()
    keyword[:, 1:] |= starts[:, :-1]
    entity = starts.long() * torch.randint(1, 100, (b, t), generator=generator)
    mask_pos = torch.full((b,), t - 2)
    ids[:, t - 2] = bb.mask_token_id
    return TokenBatch(ids, torch.ones(b, t, dtype=torch.long), keyword, entity, mask_pos).to(device)


def measure(model, mode: str, b: int, t: int, device, steps: int, warmup: int, bf16: bool) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    dmp = make_batch(model, b, t, device, g)
    cca = make_batch(model, 2 * b, t, device, g)
    targets = torch.arange(b, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    extra = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=5e-5, **extra)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = 0
            if mode in ("dmp", "both"):
                loss = loss + model.dmp(dmp)[0]
            if mode in ("cca", "both"):
                loss = loss + model.cca(cca, targets)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    sequences = (b if mode in ("dmp", "both") else 0) + (2 * b if mode in ("cca", "both") else 0)
    dims = encoder_dims(model.backbone.model)
    flops = 0.0
    if mode in ("dmp", "both"):  # the MLM head (H x H transform + H x V decoder) at the expected masked positions
        scored = int(model.cfg.mlm_probability * float(dmp.keyword_mask.sum()))
        flops += encoder_train_flops(dims, b, t, head_rows=model.backbone.vocab_size + dims["hidden"],
                                     head_positions=scored)
    if mode in ("cca", "both"):
        projection = dims["hidden"] ** 2 if model.projection is not None else 0
        flops += encoder_train_flops(dims, 2 * b, t, extra_dense_per_sequence=projection)
    return {"mode": mode, "step_s": seconds, "samples_s": b / seconds, "sequences_s": sequences / seconds,
            "tokens_s": sequences * t / seconds, "flops": flops}


def pipeline(model, max_length: int, batch: int) -> dict:
    """Turn simulated synthetic dialogs into samples, then build batches as a DataLoader worker
    would (tokenize once, slice, cut, pad)."""
    import numpy as np

    from lotcrs_plugin.data.pretrain_samples import PretrainBatchSampler, PretrainData, cca_index, dmp_index
    from lotcrs_plugin.data.turns import tokenize_dialogs
    from lotcrs_plugin.data.simulator import load_simulated, simulate
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.dataset import ensure_generated

    with tempfile.TemporaryDirectory() as tmp:
        folder = ensure_generated(SyntheticConfig(n_items=200, n_conversations=200, seed=1), Path(tmp) / "ds")
        dialogs = load_simulated(simulate(folder, {"per_item": 20, "cache_dir": str(Path(tmp) / "sim")}))
        entity2id = json.loads((folder / "entity2id.json").read_text(encoding="utf-8"))
    items = model.items
    names = {f"item {i}": i for i in items.entity_ids}
    offset = max(items.entity_ids) + 1  # the attributes keep their names, with ids after the bench items
    names.update({name: offset + i for name, i in entity2id.items()})
    names.update({f"item {i}": i for i in items.entity_ids})
    # the bench model's catalog is "item k": rename the simulated items onto it (same count or fewer)
    sim_names = sorted({m for d in dialogs for turn in d["dialog"] for m in turn["movies"]})
    rename = {n: f"item {items.entity_ids[k % len(items)]}" for k, n in enumerate(sim_names)}
    for d in dialogs:
        for turn in d["dialog"]:
            for old in turn["movies"]:
                turn["raw_text"] = turn["raw_text"].replace(old, rename[old])
            turn["movies"] = [rename[m] for m in turn["movies"]]
    bb = model.backbone
    started = time.perf_counter()
    table = tokenize_dialogs(dialogs, bb.tokenizer, bb.sep_ids, items, names)
    tokenize_s = time.perf_counter() - started
    data = PretrainData(table, bb.input_format(max_length), bb.first_item_id, dmp=dmp_index(table),
                        cca=cca_index(table))
    sampler = PretrainBatchSampler(len(data.dmp), data.cca, batch, batch, seed=0)
    specs = [s for [s] in sampler][:100]
    started = time.perf_counter()
    widths = [data[s].dmp.input_ids.shape[1] for s in specs]
    batch_s = (time.perf_counter() - started) / len(specs)
    return {"dialogs": len(dialogs), "turns": table.n_turns, "tokens": int(table.stats["tokens"]),
            "tokenize_s": tokenize_s, "dmp_samples": len(data.dmp), "batch_ms": 1000 * batch_s,
            "mean_width": float(np.mean(widths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=("minilm", "bert-base"), default=None,
                        help="minilm: all-MiniLM-L6-v2 at --model (CPU default); bert-base: BertConfig() defaults "
                             "(GPU default)")
    parser.add_argument("--model", type=Path, default=MINILM)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--items", type=int, default=6924, help="item tokens (ReDial has 6924)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default="dmp,cca,both")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA too")
    parser.add_argument("--peak", type=float, default=None,
                        help="peak FLOP/s for MFU (default: the GPU's dense bf16 peak by name)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arch = args.arch or ("bert-base" if device.type == "cuda" else "minilm")
    bf16 = device.type == "cuda" and not args.no_bf16
    peak = args.peak
    if peak is None and device.type == "cuda":
        peak = peak_bf16_flops(torch.cuda.get_device_name(device))
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if arch == "bert-base":
            path = bert_base_folder(Path(tmp) / "bert-base")
        else:
            path = args.model
            if not (path / "config.json").is_file():
                sys.exit(f"no model at {path}; run ../shared/models/get-minilm.sh or give --model")
        model = build_model(path, args.items, device, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    rows = [measure(model, mode, args.batch, args.seq, device, args.steps, args.warmup, bf16)
            for mode in args.modes.split(",")]
    pipe = None if args.no_pipeline else pipeline(model, args.seq, args.batch)
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        dev = f"{cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch thread(s)"
    cmd = "python benchmarks/bench_pretrain.py " + " ".join(sys.argv[1:])
    lines = [
        "# LOT-CRS pre-training throughput",
        "",
        f"Device: {dev}; Python {platform.python_version()}; 1-min load average at the start {load:.1f} "
        f"(the machine is shared: other work slows the steps).",
        f"Model: {arch} ({'all-MiniLM-L6-v2, ' + str(args.model) if arch == 'minilm' else 'BertConfig() defaults'}), "
        f"{n_params / 1e6:.1f} M parameters with {args.items} item tokens; batch {args.batch}, sequence {args.seq}; "
        f"{'bf16 autocast' if bf16 else 'fp32'}; {args.warmup} warm-up + {args.steps} timed steps per row.",
        f"Command: `{cmd}`",
        "",
        "A DMP sample is one sequence; a CCA sample is one pair (two sequences); `both` is the system's micro-batch "
        "(B DMP samples and B CCA pairs: 3B sequences).",
        "",
        "| objective | s / step | samples / s | sequences / s | tokens / s |" + (" MFU |" if peak else ""),
        "| --- | --- | --- | --- | --- |" + (" --- |" if peak else ""),
    ]
    for r in rows:
        util = f" {100 * mfu(r['flops'], r['step_s'], peak):.1f}% |" if peak else ""
        lines.append(f"| {r['mode']} | {r['step_s']:.3f} | {r['samples_s']:.1f} | {r['sequences_s']:.1f} | "
                     f"{r['tokens_s']:.0f} |{util}")
    if pipe:
        lines += ["", f"Sample pipeline (CPU, one process): {pipe['dialogs']} simulated dialogs of the synthetic "
                      f"dataset ({pipe['turns']} turns, {pipe['tokens']} tokens) tokenized and marked in "
                      f"{pipe['tokenize_s']:.2f} s; {pipe['dmp_samples']} DMP samples; one micro-batch (B DMP + B "
                      f"CCA pairs, sliced, cut, padded) in {pipe['batch_ms']:.1f} ms, mean padded width "
                      f"{pipe['mean_width']:.0f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
