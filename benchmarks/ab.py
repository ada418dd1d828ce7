"""One speed-up at a time: a setting's two values (A: before, B: after) trained in alternation,
step by step, in one process, on the same data (benchmarks/_alternate.py), so that a shared
machine's load hits both sides alike.

    python benchmarks/ab.py --what threads --dataset inspired_unicrs          # fine-tuning, 1 vs 2 threads
    python benchmarks/ab.py --what bf16 --dataset inspired_unicrs             # fp32 vs bf16 autocast
    python benchmarks/ab.py --what bucket --stage pretrain --dataset inspired_unicrs   # bucket_pool 0 vs 20
    python benchmarks/ab.py --what fused --dataset inspired_unicrs            # AdamW loop vs fused kernel
    python benchmarks/ab.py --what dropout --dataset inspired_unicrs          # torch's dropout vs cpu_dropout: fast
    python benchmarks/ab.py --what packed --stage pretrain --dataset inspired_unicrs   # packed_tokens off vs on

what: threads (torch intra-op threads), bf16 (autocast off / on; the CPU's ISA decides whether it
pays: lotcrs_plugin.hardware), bucket (bucket_pool, length-bucketed batches:
lotcrs_plugin.data.length_buckets), fused (AdamW as a loop over tensors / one fused kernel:
lotcrs_plugin.system.optim; each side its own optimizer over the shared model), dropout (torch's CPU
dropout / the masks of lotcrs_plugin.model.cpu_dropout, swapped into the shared model before each
side's step), packed (packed_tokens: the encoder over every padded position / over the real tokens
only, lotcrs_plugin.model.backbones.packed_bert). stage: finetune (LOTCRSSystem's training step, the CPU config's
task: no retrieval fusion) or pretrain (LOTCRSPretrainSystem's DMP + CCA micro-batch). Both sides
draw their batches from identical samplers (the same sequences when the setting does not change
them) and share one model and optimizer.

Results: benchmarks/results/speed_ab_<device>.json, one entry per (stage, what, dataset, model),
replaced when measured again; benchmarks/speed.py (and this script, when speed_<device>.json is there) writes
them as the before/after table of speed_<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import speed  # noqa: E402
from _alternate import Contender, alternate  # noqa: E402

from lotcrs_plugin.errors import UserError  # noqa: E402
from lotcrs_plugin.model.cpu_dropout import CPU_DROPOUTS, use_cpu_dropout, use_native_dropout  # noqa: E402

DEFAULTS = {"threads": ("1", "2"), "bf16": ("off", "on"), "bucket": ("0", "20"), "fused": ("off", "on"),
            "dropout": ("native", "fast"), "packed": ("off", "on")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/ab.py", description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=sorted(DEFAULTS), required=True)
    p.add_argument("--stage", choices=("finetune", "pretrain"), default="finetune")
    p.add_argument("--a", default=None,
                   help="the setting before (default: threads 1, bf16 off, bucket 0, fused off, dropout native, "
                        "packed off)")
    p.add_argument("--b", default=None,
                   help="the setting after (default: threads 2, bf16 on, bucket 20, fused on, dropout fast, packed on)")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--arch", choices=speed.ARCHS, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads of both sides (what: bf16, bucket)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/speed_ab_cpu.json)")
    args = p.parse_args(argv)
    a, b = DEFAULTS[args.what]
    args.a = args.a if args.a is not None else a
    args.b = args.b if args.b is not None else b
    for side in ("a", "b"):
        value = getattr(args, side)
        if args.what == "dropout" and value not in CPU_DROPOUTS:
            raise UserError(f"--{side} for dropout must be {' or '.join(CPU_DROPOUTS)}, not {value!r}")
        if args.what in ("bf16", "fused", "packed") and value not in ("on", "off"):
            raise UserError(f"--{side} for {args.what} must be on or off, not {value!r}")
        if args.what in ("threads", "bucket") and not (value.isdigit() and (int(value) >= 1 or args.what == "bucket")):
            raise UserError(f"--{side} for {args.what} must be a whole number{' >= 1' * (args.what == 'threads')}, "
                            f"not {value!r}")
    return args


def finetune_side(run: Any, pool: int) -> tuple[Any, Iterator[Any], Any]:
    """(system, batches, step) of fine-tuning, batches bucketed with ``pool``."""
    from lotcrs_plugin.data.finetune_samples import IndexBatches, loader

    system = run.system
    train = system.data("train")
    lengths = train.lengths()

    def batches() -> Iterator[Any]:
        epoch = 0
        while True:
            order = IndexBatches(len(train), system.cfg.batch_size, seed=system.seed, epoch=epoch, lengths=lengths,
                                 bucket_pool=pool)
            yield from loader(train, order, seed=system.seed + epoch)
            epoch += 1

    def step(batch) -> None:
        system.step(batch, "rec", "train")
        system.optimizer_step()

    return system, batches(), step


def pretrain_side(system: Any, pool: int) -> tuple[Any, Iterator[Any], Any]:
    from lotcrs_plugin.data.pretrain_samples import PretrainBatchSampler

    d, cfg = system.data("train"), system.cfg
    lengths = {"dmp_lengths": d.dmp_lengths(), "cca_lengths": d.cca_lengths() if d.cca is not None else None}

    def batches() -> Iterator[Any]:
        epoch = 0
        while True:
            sampler = PretrainBatchSampler(len(d.dmp), d.cca, cfg.batch_size, cfg.pairs_per_batch, seed=system.seed,
                                           epoch=epoch, use_dmp=system.use_dmp, use_cca=system.use_cca,
                                           bucket_pool=pool, **lengths)
            yield from system.loader("train", sampler)
            epoch += 1

    def step(batch) -> None:
        system.step(batch)
        system.optimizer_step()

    return system, batches(), step


def own_optimizer(system: Any, stage: str, fused: bool) -> Any:
    """(AdamW, its constant schedule) of the system's own groups and rates, fused or a loop over tensors."""
    from lotcrs_plugin.system.optim import adamw_linear

    cfg = system.cfg
    rates = system.model.parameter_rates() if stage == "finetune" else None
    return adamw_linear(system.model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=0.0,
                        total_steps=10**9, fused=fused, rates=rates)


def epoch_positions(stage: str, system: Any, pool: int) -> tuple[int, int]:
    """(positions computed, real tokens) over a whole epoch 0 with ``pool``: the padding that the
    timed steps (a sample of the epoch's batches) only estimate."""
    import numpy as np

    from lotcrs_plugin.data.length_buckets import padded_positions

    if stage == "finetune":
        from lotcrs_plugin.data.finetune_samples import IndexBatches

        train = system.data("train")
        lengths = train.lengths()
        order = IndexBatches(len(train), system.cfg.batch_size, seed=system.seed, epoch=0, lengths=lengths,
                             bucket_pool=pool).order
        return padded_positions(order, lengths, system.cfg.batch_size, system.cfg.pad_to_multiple_of)
    from lotcrs_plugin.data.pretrain_samples import PretrainBatchSampler

    d, cfg = system.data("train"), system.cfg
    dmp_len, cca_len = d.dmp_lengths(), d.cca_lengths() if d.cca is not None else None
    sampler = PretrainBatchSampler(len(d.dmp), d.cca, cfg.batch_size, cfg.pairs_per_batch, seed=system.seed,
                                   epoch=0, use_dmp=system.use_dmp, use_cca=system.use_cca, bucket_pool=pool,
                                   dmp_lengths=dmp_len, cca_lengths=cca_len)
    computed = real = 0
    specs = [spec for [spec] in sampler]
    if specs and specs[0].dmp is not None:
        c, r = padded_positions(np.concatenate([s.dmp for s in specs]), dmp_len, cfg.batch_size, cfg.pad_to_multiple_of)
        computed, real = computed + c, real + r
    if specs and specs[0].cca is not None:  # a pair's two rows share the batch's width
        for spec in specs:
            rows = cca_len[spec.cca.reshape(-1)]
            computed += -(-int(rows.max()) // cfg.pad_to_multiple_of) * cfg.pad_to_multiple_of * len(rows)
            real += int(rows.sum())
    return computed, real


def count(batch) -> dict[str, float]:
    """Samples, padded positions (tokens) and real tokens of a fine-tuning or pre-training batch."""
    parts = [batch.tokens] if hasattr(batch, "tokens") else [t for t in (batch.dmp, batch.cca) if t is not None]
    out = {"samples": 0.0, "tokens": 0.0, "real_tokens": 0.0}
    for t in parts:
        b, w = t.input_ids.shape
        out["samples"] += b
        out["tokens"] += b * w
        out["real_tokens"] += float(t.attention_mask.sum())
    return out


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    speed_argv = ["--dataset", args.dataset, "--batch", str(args.batch), "--seq", str(args.seq),
                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--retrieval", "off"]
    if args.arch:
        speed_argv += ["--arch", args.arch]
    run = speed.SpeedRun(speed.parse_args(speed_argv), speed_argv)
    saved = os.environ.get("LOTCRS_HOME")
    with tempfile.TemporaryDirectory(prefix="lotcrs_ab_") as tmp:
        try:
            run.setup(Path(tmp))
            run.crslab_data()
            if args.stage == "finetune":
                run.lotcrs_system()
                run.system.build_optim()
                system = run.system
            else:
                system = run.prepare_pretrain()["system"]
            system.model.train()
            loop = system.tuner.loop if args.stage == "finetune" else system.loop
            sides, positions = [], {}
            for name, value in (("A", args.a), ("B", args.b)):
                pool = int(value) if args.what == "bucket" else 0
                system, batches, step = (finetune_side(run, pool) if args.stage == "finetune"
                                         else pretrain_side(system, pool))
                optimizer = own_optimizer(system, args.stage, value == "on") if args.what == "fused" else None

                def enter(value=value) -> None:
                    if args.what == "threads":
                        torch.set_num_threads(int(value))
                    elif args.threads:
                        torch.set_num_threads(args.threads)
                    if args.what == "bf16":
                        system.autocast = value == "on"
                    if optimizer is not None:
                        loop.optimizer, loop.scheduler = optimizer
                    if args.what == "dropout":
                        swap = use_cpu_dropout if value == "fast" else use_native_dropout
                        swap(system.model.backbone)
                    if args.what == "packed":
                        system.model.backbone.pack_tokens = value == "on"

                sides.append(Contender(name, step, count, batches=batches, enter=enter))
                positions[name] = epoch_positions(args.stage, system, pool)
            totals = alternate(sides, steps=args.steps, warmup=args.warmup, rounds=args.steps)
        finally:
            run.__dict__.pop("system", None)
            if saved is None:
                os.environ.pop("LOTCRS_HOME", None)
            else:
                os.environ["LOTCRS_HOME"] = saved
            run.restore()
    out: dict[str, Any] = {}
    for side, value in (("A", args.a), ("B", args.b)):
        t = totals[side]
        out[side] = {"setting": value, "seconds": t["seconds"], "samples": t["samples"],
                     "samples_s": t["samples"] / t["seconds"], "tokens": t["tokens"],
                     "padding_share": 1 - t["real_tokens"] / t["tokens"],
                     "epoch_positions": positions[side][0],
                     "epoch_padding_share": 1 - positions[side][1] / positions[side][0]}
    from lotcrs_plugin.hardware import cpu_info

    omp = os.environ.get("OMP_NUM_THREADS")
    return {"stage": args.stage, "what": args.what, **out, "ratio": out["B"]["samples_s"] / out["A"]["samples_s"],
            "steps": args.steps, "dataset": args.dataset, "arch": run.arch, "batch": args.batch, "max_length": args.seq,
            "cpu": cpu_info().describe(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": (f"OMP_NUM_THREADS={omp} " if omp else "") + "python benchmarks/ab.py"
                       + "".join(" " + shlex.quote(x) for x in argv)}


def record(entry: dict[str, Any], out: Path | None) -> None:
    """Put ``entry`` into the results JSON (replacing the one of the same stage and setting) and,
    when speed_cpu.json is there, write speed_cpu.md again with the table."""
    path = out or BENCH / "results" / "speed_ab_cpu.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    key = ("stage", "what", "dataset", "arch")
    entries = [e for e in entries if [e.get(k) for k in key] != [entry.get(k) for k in key]] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    page = path.with_name("speed_cpu.json")
    if out is None and page.is_file():  # the before/after table of speed_cpu.md, up to date
        from speed_report import markdown, page_inputs

        md = path.with_name("speed_cpu.md")
        md.write_text(markdown(json.loads(page.read_text()), *page_inputs(md)), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from loguru import logger

    for name in ("crslab", "lotcrs_plugin"):
        logger.disable(name)
    entry = measure(args, argv)
    record(entry, args.out)
    a, b = entry["A"], entry["B"]
    print(f"{args.stage} {args.what}: A={a['setting']} {a['samples_s']:.2f} samples/s (padding "
          f"{100 * a['padding_share']:.0f}%), B={b['setting']} {b['samples_s']:.2f} samples/s (padding "
          f"{100 * b['padding_share']:.0f}%): B/A {entry['ratio']:.2f}x; {entry['cpu']}")
    return entry


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
