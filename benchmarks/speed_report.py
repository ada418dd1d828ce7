"""The Markdown page of benchmarks/speed.py's results (speed_<device>.md), from its JSON."""

from __future__ import annotations

from pathlib import Path


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


WHAT = {"threads": "torch threads", "bf16": "bf16 autocast", "bucket": "bucket_pool (length-bucketed batches)",
        "tokenize": "tokenizer call (dialogs/s, not samples/s)",
        "fused": "fused AdamW (one kernel for the update)",
        "dropout": "CPU dropout masks (cpu_dropout: 8 per 64-bit draw; softmax and dropout in one autograd function)",
        "packed": "packed_tokens (the encoder's token-wise layers on the real tokens only)"}


def page_inputs(md: Path) -> tuple[list[dict] | None, str]:
    """(ab entries, notes) kept next to speed_<device>.md: speed_ab_<device>.json, speed_<device>_notes.md."""
    import json

    kind = md.stem.split("_", 1)[1] if "_" in md.stem else "cpu"
    ab, notes = md.with_name(f"speed_ab_{kind}.json"), md.with_name(f"{md.stem}_notes.md")
    return (json.loads(ab.read_text()) if ab.is_file() else None,
            notes.read_text(encoding="utf-8") if notes.is_file() else "")


def _padding(side: dict) -> str:
    """The whole epoch's padding share when measured (ab.py), else that of the timed batches."""
    return f"{100 * side.get('epoch_padding_share', side['padding_share']):.0f}%"


def ab_table(entries: list[dict]) -> list[str]:
    """The before/after table of benchmarks/ab.py's entries (each speed-up measured on its own)."""
    if not entries:
        return []
    lines = ["## Speed-ups, each measured on its own", "",
             "Each row: one setting's two values trained in alternation, step by step, in one process, on the same "
             "data and model (benchmarks/ab.py); B/A is the ratio of their samples/s; padding is the share of "
             "padded positions among the positions computed over a whole epoch (the timed steps are a sample of "
             "its batches).", "",
             "| stage | setting | data, model | A | B | A samples/s | B samples/s | B/A | padding A -> B | steps | "
             "CPU, load | command |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    for e in sorted(entries, key=lambda e: (e["stage"], e["what"], e.get("dataset", ""), e.get("arch") or "")):
        a, b = e["A"], e["B"]
        lines.append(f"| {e['stage']} | {WHAT.get(e['what'], e['what'])} | {e.get('dataset')}, "
                     f"{e.get('arch') or '-'} | "
                     f"{a['setting']} | {b['setting']} | "
                     f"{a['samples_s']:.2f} | {b['samples_s']:.2f} | {e['ratio']:.2f}x | "
                     f"{_padding(a)} -> {_padding(b)} | {e['steps']} | "
                     f"{e['cpu']}, {e['cpus']} CPUs, load {e['load_average']:.1f}, {e['date']} | `{e['command']}` |")
    return lines + [""]


def markdown(rep: dict, ab_entries: list[dict] | None = None, notes: str = "") -> str:
    """The page; ``ab_entries``: benchmarks/ab.py's rows; ``notes``: hand-written findings
    (speed_<device>_notes.md) appended as they are."""
    d, s, r = rep["device"], rep["setup"], rep["results"]
    if d["type"] == "cuda":
        dev = (f"{d['name']}, CUDA {d.get('cuda')}, peak {d['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense"
               if d.get("peak_flops") else f"{d['name']}, CUDA {d.get('cuda')}, no peak known (give --peak)")
        dev += f", TF32 matmul {'on' if d.get('tf32_matmul') else 'off'}"
    else:
        dev = f"{d.get('cpu') or d['name']}, {d['cpus']} logical CPUs, {d['torch_threads']} torch thread(s)"
        if d.get("omp_num_threads"):
            dev += f", OMP_NUM_THREADS={d['omp_num_threads']}"
    versions = ", ".join(f"{k} {d[k]}" for k in ("torch", "transformers", "crslab", "faiss") if d.get(k))
    lines = [f"# LOT-CRS speed on {d['kind'].upper() if d['type'] == 'cuda' else 'CPU'}", "",
             f"Device: {dev}; {versions}; Python {d['python']}; 1-min load average at the end {d['load_average']:.1f}.",
             f"Command: `{rep['command']}`", ""]
    data = f"dataset `{s['dataset']}`"
    if s["dataset"] == "synthetic":
        data += f" ({s['items']} items, {s['conversations']} dialogs)"
    model = s.get("arch") or "-"
    if s.get("dims"):
        dm = s["dims"]
        model += (f": {dm['layers']} layers, hidden {dm['hidden']}, {dm['dense_params'] / 1e6:.1f} M dense parameters"
                  f", vocabulary {s['vocab_size']} with {s['n_items']} item tokens")
    if s.get("tokenizer"):
        model += f"; tokenizer: {s['tokenizer']}"
    lines += [f"Data: {data}, {s['per_item']} simulated conversations per item. Model: {model}. "
              f"Training batch {s['batch']} (pre-training: {s['batch']} DMP samples + {s['batch']} CCA pairs per "
              f"micro-batch), max length {s['max_length']}, {s['warmup']} warm-up + {s['steps']} timed steps per "
              f"loop; evaluation batch {s['eval_batch']}.", ""]
    for part, reason in rep["skipped"].items():
        lines.append(f"Skipped {part}: {reason}.")
    for note in rep["notes"]:
        lines.append(f"Note: {note}.")
    if rep["skipped"] or rep["notes"]:
        lines.append("")
    cuda = d["type"] == "cuda"
    lines += ["| part | result | detail |", "| --- | ---: | --- |"]
    if "simulator" in r:
        x = r["simulator"]
        lines.append(f"| simulator | {_f(x['conversations_s'])} conversations/s | {x['conversations']} conversations "
                     f"({x['turns']} turns) for {x['items']} items in {x['seconds']:.2f} s |")
    for key, label in (("hf_reference", "plain Hugging Face loop (reference)"), ("pretrain", "LOT-CRS pre-training"),
                       ("crslab_bert", "CRSLab BERT recommender"), ("finetune", "LOT-CRS fine-tuning")):
        if key not in r:
            continue
        x = r[key]
        detail = f"{_f(x['tokens_s'])} tokens/s, {x['step_s']:.3f} s/step"
        if cuda or x.get("mfu") is not None:
            detail += f", MFU {_pct(x.get('mfu'))}"
        if key == "pretrain":
            detail += (f"; {_f(x['examples_s'])} examples/s (DMP samples + CCA pairs); mean width "
                       f"{x['mean_width']:.0f}; {'bf16 autocast' if x['bf16'] else 'fp32'}; samples built in "
                       f"{x['sample_build_s']:.2f} s ({x['dmp_samples']} DMP samples)")
        elif key == "crslab_bert":
            detail += (f"; {x['precision']}; the pre-training sequences as {x['crslab_batches_per_step']} "
                       f"batches per step")
        elif key == "hf_reference":
            detail += (f"; {x['precision']}; AutoModel + mean pooling + a linear layer over the items, AdamW; the "
                       f"fine-tuning sequences; mean width {x['mean_width']:.0f}")
        else:
            detail += (f"; {x['train_samples']} training samples, retrieval {'on' if x['retrieval'] else 'off'}, "
                       f"{'bf16 autocast' if x['bf16'] else 'fp32'}; mean width {x['mean_width']:.0f}")
        if cuda:
            detail += f"; peak {_f(x['cuda_peak_mb'], 0)} MB"
        lines.append(f"| {label} | {_f(x['samples_s'])} samples/s | {detail} |")
    for key, label in (("pretrain", "pre-training"), ("crslab_bert", "CRSLab BERT"), ("finetune", "fine-tuning")):
        if key in r.get("vs_reference", {}):
            x = r["vs_reference"][key]
            lines.append(f"| ratio {label} / plain HF loop | {x['samples']:.2f}x samples/s | {x['tokens']:.2f}x "
                         f"tokens/s |")
    if "ratio" in r:
        lines.append(f"| ratio pre-training / CRSLab BERT | {r['ratio']['samples']:.2f}x samples/s | "
                     f"{r['ratio']['tokens']:.2f}x tokens/s, same sequences |")
    if "store" in r:
        x = r["store"]
        lines.append(f"| memory store build | {x['seconds']:.2f} s | {x['entries']} entries for {x['items']} "
                     f"items ({x['index']} index; encoding + index); simulated samples built in "
                     f"{x['sample_build_s']:.2f} s |")
    if "retrieval" in r:
        x = r["retrieval"]
        lines.append(f"| retrieval | {_f(x['queries_s'])} queries/s | MemoryStore.search, top-{x['top_k']} of "
                     f"{x['entries']}, batches of {x['batch']}, {x['queries']} queries |")
    if "evaluation" in r:
        x = r["evaluation"]
        lines.append(f"| evaluation, full catalog | {x['seconds']:.2f} s | {x['samples']} test samples x {x['items']} "
                     f"items ({_f(x['samples_s'])} samples/s), retrieval {'on' if x['retrieval'] else 'off'}, "
                     f"long-tail report included |")
    m = r["memory"]
    mem = f"| peak memory | {_f(m['peak_rss_mb'], 0)} MB RSS |"
    together = "the four training loops held together while they alternate"
    mem += (f" CUDA max allocated {_f(m['cuda_peak_mb'], 0)} MB ({together}) |" if "cuda_peak_mb" in m
            else f" the whole process ({together}) |")
    lines.append(mem)
    rounds = r.get("pretrain", {}).get("rounds")
    lines += ["", "How it is measured: one process, the parts in the order above, on the same dataset. A sample is "
              "one encoder input sequence (a DMP context, each side of a CCA pair, a recommendation context). "
              f"The four training loops alternate in {rounds or '-'} block(s) of the timed steps, so that a change of "
              "the machine's load hits all of them. CRSLab's BERT recommender (TGReDialSystem.step: forward, "
              "backward, its optimizer step with the gradient norm) runs on the very sequences of the timed "
              "pre-training micro-batches, in batches of the same size and width (item tokens as [UNK]); the plain "
              "Hugging Face loop (benchmarks/hf_reference.py: AutoModel from the same folder, mean pooling, one "
              "linear layer over the items, cross-entropy, AdamW, fp32) on the very rows of the timed fine-tuning "
              "batches (item tokens as [UNK]). Both baselines are timed without batch building, LOT-CRS with its "
              "DataLoader. MFU = model FLOPs / time / peak, model FLOPs per step = 6 N per token (N: the "
              "dense encoder weights, embeddings excluded) + 12 L H T per token (attention, T the padded width) "
              "+ 6 H V per position scored by an output head (MLM head over the vocabulary at the expected masked "
              "keyword positions, verbaliser over the items, CRSLab's item layer over the entities), as "
              "benchmarks/_common.py computes it; padded positions count. Fine-tuning runs without the "
              "label-smoothness teacher (its KL term is a lookup); its fusion and retrieval-loss FLOPs are left out "
              "of MFU. Pre-training and fine-tuning use their systems' own settings otherwise (AdamW, clipping, "
              "bf16 autocast where lotcrs_plugin.hardware says the device runs it fast); CRSLab's BERT and the "
              "plain loop run in fp32.", ""]
    if not cuda:
        lines += ["On a GPU: `python benchmarks/speed.py --device cuda --arch bert-base` (BERT-base from BertConfig(), "
                  "bf16 autocast, MFU against the GPU's dense bf16 peak) writes speed_<gpu>.md; on the lent GPU "
                  "machines, which lack crslab and faiss, benchmarks/gpu_wheels.sh prepares the wheels to carry.", ""]
    lines += ab_table(ab_entries or [])
    if notes.strip():
        lines += [notes.strip(), ""]
    return "\n".join(lines)



__all__ = ["markdown"]
