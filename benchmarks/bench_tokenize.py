"""Tokenization of a dataset's dialogs (lotcrs_plugin.data.turns.tokenize_dialogs), the
Rust backend called directly (after) against transformers' own tokenizer call (before),
alternating, each round on the same dialogs; both must give the same TurnTable.

    LOTCRS_HOME=/work/lh python benchmarks/bench_tokenize.py --dataset inspired_unicrs --rounds 3

Writes its row into benchmarks/results/speed_ab_cpu.json (stage data, setting tokenize), which
benchmarks/speed.py shows in speed_cpu.md's before/after table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

from ab import record  # noqa: E402
from lotcrs_plugin.errors import UserError  # noqa: E402

MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))


def transformers_call(tokenizer, texts):
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="benchmarks/bench_tokenize.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a dataset made by `crslab import-data`")
    p.add_argument("--split", default="train")
    p.add_argument("--backbone-path", type=Path, default=MINILM)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from lotcrs_plugin import paths, registry
    from lotcrs_plugin.data import turns
    from lotcrs_plugin.data.item_vocab import ItemVocab
    from lotcrs_plugin.hardware import cpu_info
    from lotcrs_plugin.model.backbones import build_backbone

    found = registry.imported_dataset_folders(paths.Layout(paths.resolve_root()).dataset)
    if args.dataset not in found:
        raise UserError(f"--dataset {args.dataset}: not imported under {paths.resolve_root()}; known: "
                        f"{', '.join(found) or 'none'}")
    folder = Path(found[args.dataset])
    items = ItemVocab.from_folder(folder)
    entity2id = json.loads((folder / "entity2id.json").read_text(encoding="utf-8"))
    backbone = build_backbone("bert", str(args.backbone_path))
    backbone.add_item_tokens(items.display_names, items.entity_ids)
    dialogs = json.loads((folder / f"{args.split}_data.json").read_text(encoding="utf-8"))
    fast = turns._encode
    seconds = {"A": 0.0, "B": 0.0}
    tables = {}
    try:
        for _ in range(args.rounds):
            for side, encode in (("A", transformers_call), ("B", fast)):
                turns._encode = encode
                started = time.perf_counter()
                tables[side] = turns.tokenize_dialogs(dialogs, backbone.tokenizer, backbone.sep_ids, items, entity2id)
                seconds[side] += time.perf_counter() - started
    finally:
        turns._encode = fast
    for key in ("ids", "keyword", "entity", "turn_offsets", "dialog_offsets", "item_offsets", "turn_items"):
        if not np.array_equal(getattr(tables["A"], key), getattr(tables["B"], key)):
            raise RuntimeError(f"the two tokenizer calls differ in {key}")
    n = len(dialogs) * args.rounds
    sides = {s: {"setting": name, "seconds": seconds[s], "samples": n, "samples_s": n / seconds[s],
                 "tokens": float(tables[s].stats["tokens"]) * args.rounds, "padding_share": 0.0}
             for s, name in (("A", "transformers call"), ("B", "Rust backend"))}
    entry = {"stage": "data", "what": "tokenize", **sides, "ratio": seconds["A"] / seconds["B"],
             "steps": args.rounds, "dataset": args.dataset, "arch": args.backbone_path.name, "split": args.split,
             "unit": "dialogs",
             "cpu": cpu_info().describe(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": "python benchmarks/bench_tokenize.py" + "".join(" " + shlex.quote(x) for x in argv)}
    record(entry, args.out)
    print(f"tokenize {args.dataset}/{args.split}: {sides['A']['samples_s']:.0f} -> {sides['B']['samples_s']:.0f} "
          f"dialogs/s ({entry['ratio']:.2f}x), identical tables; {entry['cpu']}")
    return entry


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
