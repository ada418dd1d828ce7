"""A function check of the conversation stage on INSPIRED on CPU: builds a random tiny GPT-2 (2
layers, hidden 64) with GPT-2's real BPE files, runs crslab_configs/lotcrs_inspired_conversation_cpu.yaml
(the recommender, then the conversation stage) and writes a table of the test metrics with a few
replies. The numbers show that the stage trains, selects, generates and is scored; a random tiny
model says nothing about the method's quality (see the README).

    python benchmarks/conversation_check.py [--bpe ../shared/models/gpt2-bpe]
        [--dest ~/.cache/lotcrs/models/tiny-gpt2-conv] [--set key=value ...] [--variant NAME=key=value ...]
        [--out benchmarks/results/conversation_inspired.md]

Run with LOTCRS_HOME pointing at a root that holds the imported inspired_unicrs dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "crslab_configs" / "lotcrs_inspired_conversation_cpu.yaml"
METRICS = ("bleu@1", "bleu@2", "dist@1", "dist@2", "dist@3", "dist@4", "ppl", "item_share", "ref_item_share")


def tiny_gpt2(bpe: Path, dest: Path, n_merges: int) -> Path:
    """A random GPT-2 with GPT-2's tokenizer cut to its first ``n_merges`` merges (0: all; a valid
    BPE: the byte alphabet, then the merges kept, in order, as tests/test_lotcrs.small_bpe), saved
    to ``dest`` (kept if it is there with the same cut)."""
    marker = dest / "lotcrs_tiny_gpt2.json"
    if (dest / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text())["merges"] == n_merges:
        return dest
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab = json.loads((bpe / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (bpe / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    if n_merges:
        kept = dict(sorted(vocab.items(), key=lambda kv: kv[1])[:256 + n_merges])
        kept["<|endoftext|>"] = len(kept)
        vocab, merges = kept, merges[:n_merges]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(dest)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=1024)).save_pretrained(dest)
    marker.write_text(json.dumps({"merges": n_merges}))
    return dest


def run_variant(overrides: list[str]) -> dict:
    from lotcrs_plugin import paths
    from lotcrs_plugin.runner import run

    started = time.perf_counter()
    result = run(str(CONFIG), overrides=overrides)
    conv_run = next((o.split("=", 1)[1] for o in overrides if o.startswith("conversation.run_name=")),
                    "inspired_conversation_check_conv")
    summary = json.loads((paths.active_layout().save / conv_run / "conversation.json").read_text(encoding="utf-8"))
    rec = result.test.get("longtail", {}).get("metrics", {})
    return {"summary": summary, "rec": rec, "seconds": round(time.perf_counter() - started, 1)}


def fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpe", type=Path, default=REPO.parent / "shared" / "models" / "gpt2-bpe")
    parser.add_argument("--dest", type=Path, default=Path("~/.cache/lotcrs/models/tiny-gpt2-conv").expanduser(),
                        help="where the tiny GPT-2 is written (kept and reused if it is there)")
    parser.add_argument("--merges", type=int, default=3000,
                        help="keep GPT-2's first N BPE merges (0: all 50,000): a 3,257-token vocabulary trains ~10x faster")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="for every variant")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=key=value: one more run (e.g. no_retrieved_prompt=conversation.retrieved_prompt=false)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "conversation_inspired.md")
    args = parser.parse_args()
    if not (args.bpe / "vocab.json").is_file():
        raise SystemExit(f"no GPT-2 BPE files at {args.bpe}; give --bpe")
    dest = tiny_gpt2(args.bpe, args.dest, args.merges)
    base = [f"conversation.backbone_path={dest}", *args.overrides]
    variants = {"LOT-CRS conversation (retrieved prompt + item)": base}
    for spec in args.variant:
        name, _, change = spec.partition("=")
        variants[name] = [*base, change, f"conversation.run_name=inspired_conversation_check_{name}"]
    runs = {name: run_variant(o) for name, o in variants.items()}

    lines = ["# Conversation stage on INSPIRED: a FUNCTION CHECK, not a quality measurement", "",
             f"A random tiny GPT-2 (2 layers, hidden 64, GPT-2's real BPE tokenizer cut to its first {args.merges} merges "
             "(0: all); no pre-trained weights exist on this machine) fine-tuned for 2 epochs of 300 batches of 8 (validation and test: the first 300 responses), on top of a random tiny BERT recommender "
             "trained for 50 batches. These numbers show that the stage trains, keeps the best validation epoch, "
             "generates, fills the <movie> slot with the recommended item and is scored; they say nothing about "
             "LOT-CRS's replies. The paper-sized run: crslab_configs/lotcrs_inspired_conversation.yaml "
             "(DialoGPT-small, GPU).", "",
             f"Device: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs), no GPU. Config: "
             f"`{CONFIG.relative_to(REPO)}`; command: `LOTCRS_HOME=<root with inspired_unicrs> OMP_NUM_THREADS=1 "
             f"python benchmarks/conversation_check.py --merges {args.merges}" + "".join(f" --variant {v}" for v in args.variant) + "`.", "",
             "| variant | " + " | ".join(METRICS) + " | replies | best epoch | valid ppl by epoch | run (s) |",
             "|" + "---|" * (len(METRICS) + 5)]
    for name, r in runs.items():
        s = r["summary"]
        t = s["test"]
        ppls = ", ".join(fmt(h["valid"].get("ppl")) for h in s["history"])
        lines.append(f"| {name} | " + " | ".join(fmt(t.get(m)) for m in METRICS)
                     + f" | {t.get('replies')} | {s['best_epoch']} | {ppls} | {r['seconds']} |")
    lines += ["", "Definitions (lotcrs_plugin/evaluator/conversation.py): bleu@k is CRSLab's BleuMetric; dist@k is "
              "CRSLab's distinct-n (distinct word n-grams over all replies / replies, not a ratio); ppl is exp of the "
              "mean NLL per reference token given the variant's prompt (the recommender's item in it unless the variant leaves it out); item_share: replies that name "
              "the recommended item; ref_item_share: the same for the references.", ""]
    first = next(iter(runs.values()))
    rec = first["rec"]
    if rec:
        lines += ["The recommender under it (test): " + ", ".join(f"{k} {fmt(rec.get(k))}" for k in
                                                             ("recall@1", "recall@10", "recall@50")) + ".", ""]
    lines += ["Test replies (the first five; the slot filled with the recommender's item):", "",
              "| context (last turn) | reference | recommended | reply |", "|---|---|---|---|"]
    for ex in first["summary"]["examples"][:5]:
        cells = [ex["context"], ex["reference"], ex["recommended"], ex["reply"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
