"""Speed of LOT-CRS on one dataset in one process, beside CRSLab's own BERT recommender.

Measured, in this order, on the same data:

1. simulator: the balanced-data simulator over the dataset (uncached), conversations/s;
2. pre-training: LOTCRSPretrainSystem's training step (DMP + CCA micro-batch from its own
   DataLoader, ``step`` + ``optimizer_step``), samples/s, tokens/s, MFU (CUDA);
3. CRSLab's BERT recommender (``rec_model: BERT``, TGReDialSystem.step: forward, backward,
   optimizer) on the very same token sequences, in batches of the same size and width, and the
   ratio LOT-CRS pre-training samples/s over CRSLab BERT samples/s. The two alternate (every step
   on CPU, in 5 blocks on CUDA: --rounds), so that a shared machine's changing load hits both;
4. memory store: LOTCRSSystem.build_store (encode the simulated contexts, build the faiss index),
   seconds; retrieval: MemoryStore.search with the test contexts as queries, queries/s;
5. fine-tuning: LOTCRSSystem's training step (retrieval fusion and retrieval loss on when faiss
   is there), samples/s, MFU (CUDA);
6. evaluation: LOTCRSSystem.evaluate('test'): every test sample scored against every catalog item
   and the long-tail evaluator's report, seconds;
7. peak memory: the process's peak RSS; on CUDA also torch.cuda.max_memory_allocated per part.

A sample is one input sequence of the encoder: a DMP context, each side of a CCA pair (a CCA pair
is two samples, its "example" one), a recommendation context. CRSLab's BERT gets the sequences of
each timed pre-training micro-batch as three batches of B (the DMP rows, the CCA anchors, the CCA
positives), item tokens replaced by [UNK] (its vocabulary has none). Its timing leaves out batch
building, LOT-CRS's includes its DataLoader. CUDA is synchronised around every timed loop; the
warm-up steps are not timed.

    python benchmarks/speed.py                                   # CPU, synthetic, MiniLM (tiny without it)
    python benchmarks/speed.py --device cuda --arch bert-base    # GPU: BERT-base from BertConfig(), bf16
    python benchmarks/speed.py --dataset redial_partial --arch minilm --steps 5

Without crslab (it imports the systems) only the simulator runs; without faiss the memory store
and retrieval are skipped and fine-tuning runs without retrieval. Each skip is one line on stderr
and in the results. Results: benchmarks/results/speed_<device>.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import cpu_name, encoder_dims, encoder_train_flops, mfu, peak_bf16_flops  # noqa: E402

from lotcrs_plugin.errors import UserError  # noqa: E402

MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))
ARCHS = ("tiny", "minilm", "bert-base")
PARTS = ("simulator", "pretrain", "crslab_bert", "store", "retrieval", "finetune", "evaluation")


# ---- arguments -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/speed.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic", help="synthetic, or a dataset made by `crslab import-data`")
    p.add_argument("--items", type=int, default=200, help="synthetic: catalog size")
    p.add_argument("--conversations", type=int, default=600, help="synthetic: dialogs over all splits")
    p.add_argument("--per-item", type=int, default=5, help="simulated conversations per item")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--arch", choices=ARCHS, default=None,
                       help="tiny: builtin:tiny-bert (2 layers, hidden 64); minilm: all-MiniLM-L6-v2 from "
                            f"{MINILM}; bert-base: BertConfig() defaults, random weights (no download). "
                            "Default: bert-base on CUDA, minilm on CPU (tiny when it is not there)")
    model.add_argument("--backbone-path", type=Path, default=None, help="a local BERT-architecture model folder")
    p.add_argument("--batch", type=int, default=16, help="training batch: DMP samples and CCA pairs per "
                                                          "pre-training micro-batch, fine-tuning samples")
    p.add_argument("--eval-batch", type=int, default=32, help="store, retrieval and evaluation batches")
    p.add_argument("--seq", type=int, default=128, help="max_length of pre-training and fine-tuning inputs")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 3 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--rounds", type=int, default=0,
                   help="pre-training and CRSLab's BERT alternate in this many blocks of the timed steps "
                        "(0: every step on CPU, 5 blocks on CUDA)")
    p.add_argument("--queries", type=int, default=2048, help="retrieval queries timed (test contexts, cycled)")
    p.add_argument("--peak", type=float, default=None,
                   help="peak FLOP/s for MFU (default: the GPU's dense bf16 peak by name; none on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's setting)")
    p.add_argument("--out", type=Path, default=None,
                   help="Markdown results file (default benchmarks/results/speed_<device>.md); the JSON goes "
                        "next to it")
    p.add_argument("--verbose", action="store_true", help="keep CRSLab's and the plugin's log lines")
    args = p.parse_args(argv)
    for key in ("items", "conversations", "per_item", "batch", "eval_batch", "queries"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, not {getattr(args, key)}")
    if args.seq < 16:
        raise UserError(f"--seq must be at least 16 (the prompt and a context), not {args.seq}")
    if args.rounds < 0:
        raise UserError(f"--rounds must be 0 or more, not {args.rounds}")
    for key in ("steps", "warmup"):
        value = getattr(args, key)
        if value is not None and value < (1 if key == "steps" else 0):
            raise UserError(f"--{key} must be at least {1 if key == 'steps' else 0}, not {value}")
    return args


# ---- small helpers ---------------------------------------------------------------------------

def missing_reason(module: str) -> str | None:
    """Why ``module`` cannot be used here (None when it can)."""
    try:
        if module == "crslab":
            from lotcrs_plugin import compat

            compat.apply()  # crslab is imported only through the patches
        else:
            importlib.import_module(module)
    except Exception as err:  # an install that is there but broken counts as missing too
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def device_kind(device_name: str, device_type: str) -> str:
    """A short file-name word for the device: cpu, h100, a100, ... (cuda when unknown)."""
    if device_type != "cuda":
        return "cpu"
    import re

    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name.upper())
    return m.group(1).lower() if m else "cuda"


def release(cuda: bool) -> None:
    """Free a part's models before the next (a system and its evaluator hold each other)."""
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Timer:
    """Wall time of a block, CUDA synchronised at both ends."""

    def __init__(self, device):
        self.device, self.seconds = device, 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self.sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.started


# ---- the run ---------------------------------------------------------------------------------

class SpeedRun:
    """State shared by the parts: the temporary root, the dataset, the backbone, the systems."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        import torch

        self.args = args
        try:
            self.device = torch.device(args.device)
        except RuntimeError:
            self.device = None
        if self.device is None or self.device.type not in ("cpu", "cuda") or self.device.index not in (None, 0):
            raise UserError(f"--device must be cpu or cuda (pick the GPU with CUDA_VISIBLE_DEVICES), "
                            f"not {args.device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")
        self.cuda = self.device.type == "cuda"
        self.steps = args.steps if args.steps is not None else (30 if self.cuda else 3)
        self.warmup = args.warmup if args.warmup is not None else (5 if self.cuda else 1)
        # alternation of pre-training and CRSLab's BERT: every step on a CPU shared with other jobs;
        # blocks on a GPU, so that each side keeps its own asynchronous queue between syncs
        self.rounds = args.rounds or (min(5, self.steps) if self.cuda else self.steps)
        self.argv = argv
        self.results: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        if self.cuda:
            self.device_name = torch.cuda.get_device_name(self.device)
            self.peak = args.peak if args.peak is not None else peak_bf16_flops(self.device_name)
        else:
            self.device_name = cpu_name()
            self.peak = args.peak
        self.missing = {m: missing_reason(m) for m in ("crslab", "faiss")}
        from lotcrs_plugin import paths

        self.previous_layout = paths._active  # put back by restore()

    # -- bookkeeping

    def skip(self, part: str, reason: str) -> None:
        self.skipped[part] = reason
        print(f"speed.py: skipping {part}: {reason}", file=sys.stderr, flush=True)

    def part(self, name: str, fn: Callable[[], dict], needs: tuple[str, ...] = (), *, several: bool = False) -> None:
        """Run one part unless a module or an earlier part it needs is missing; ``several``: fn
        returns the results of several parts by name (measured together)."""
        for need in needs:
            if need in self.missing and self.missing[need]:
                return self.skip(name, f"needs {need} ({self.missing[need]})")
            if need in PARTS and need not in self.results:
                return self.skip(name, f"needs the {need} part, which did not run")
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        print(f"speed.py: {name} ...", file=sys.stderr, flush=True)
        results = fn() if several else {name: fn()}
        for result in results.values():
            if self.cuda:  # parts measured together share their peak
                result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.results.update(results)

    def timed_loop(self, batches: Iterator[Any], step: Callable[[Any], None],
                   count: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        """``warmup`` untimed steps, then ``steps`` timed ones (fetching the batch included);
        totals of ``count`` over the timed batches, per second."""
        for _ in range(self.warmup):
            step(next(batches))
        totals: dict[str, float] = {}
        taken = []
        with Timer(self.device) as t:
            for _ in range(self.steps):
                batch = next(batches)
                step(batch)
                taken.append(batch)
        for batch in taken:
            for k, v in count(batch).items():
                totals[k] = totals.get(k, 0.0) + v
        return self.rates(totals, t.seconds)

    # -- set-up

    def setup(self, root: Path) -> None:
        """The temporary root (everything written goes there), the dataset folder and its options."""
        from lotcrs_plugin import paths, registry

        args = self.args
        self.root = root
        user_root = paths.resolve_root()
        os.environ[paths.ENV_VAR] = str(root)
        paths.apply_to_crslab(root)
        self.sim_block = {"per_item": args.per_item, "cache_dir": str(root / "simulated")}
        self.opt: dict[str, Any] = {"dataset": args.dataset, "tokenize": "nltk", "seed": 0,
                                    "simulation": dict(self.sim_block)}
        if args.dataset == "synthetic":
            from lotcrs_plugin.data.synthetic import SyntheticConfig, ensure_generated

            block = {"n_items": args.items, "n_conversations": args.conversations, "seed": 0}
            self.opt["synthetic"] = block
            self.folder = ensure_generated(SyntheticConfig.from_dict(block))
            self.user_datasets = None
        else:
            found = registry.imported_dataset_folders(paths.Layout(user_root).dataset)
            if args.dataset not in found:
                raise UserError(f"--dataset {args.dataset}: no such imported dataset under {user_root}; "
                                f"known: {', '.join(['synthetic', *found]) }")
            self.folder = found[args.dataset]
            self.user_datasets = paths.Layout(user_root).dataset
        if not self.missing["crslab"]:
            registry.register_all(str(root))
            if self.user_datasets is not None:  # read the dataset where it is; write under the temporary root
                registry.register_imported(self.user_datasets)

    def restore(self) -> None:
        """CRSLab's paths and imported datasets as they were before setup() (call after the
        environment is restored)."""
        from lotcrs_plugin import paths, registry

        if self.missing["crslab"]:
            paths._active = self.previous_layout
            return
        layout = paths.apply_to_crslab(self.previous_layout.root if self.previous_layout is not None else None)
        registry.register_imported(layout.dataset)

    # -- 1. simulator

    def simulator(self) -> dict:
        from lotcrs_plugin.data.simulator import load_stats, simulate

        started = time.perf_counter()
        path = simulate(self.folder, dict(self.sim_block))  # a fresh cache folder: generated now
        seconds = time.perf_counter() - started
        stats = load_stats(path)
        return {"conversations": stats["conversations"], "turns": stats["turns"], "items": stats["items"],
                "seconds": seconds, "conversations_s": stats["conversations"] / seconds}

    # -- CRSLab data and the backbone

    def crslab_data(self) -> None:
        """CRSLab's dataset and loaders (nltk tokenization) for the LOT-CRS systems."""
        from crslab.data import get_dataloader, get_dataset

        from lotcrs_plugin import config as run_config

        args = self.args
        opt = dict(self.opt, model="LOTCRS", backbone="bert", backbone_path="(set below)", evaluator="longtail")
        opt["lotcrs_pretrain"] = {"run_name": "speed_pretrain", "epochs": 1, "batch_size": args.batch,
                                  "grad_accumulation": 1, "max_length": args.seq, "checkpoint_every": 0}
        opt["lotcrs"] = {"run_name": "speed_lotcrs", "pretrain": False, "retrieval": not self.missing["faiss"],
                         "batch_size": args.batch, "grad_accumulation": 1, "eval_batch_size": args.eval_batch,
                         "max_length": args.seq}
        opt["smoothing"] = {"teacher": "none"}
        opt["selection"] = {"enabled": False}
        opt = run_config.validate(opt, where="speed.py")
        run_config.check_names(opt, where="speed.py")
        self.crs = run_config.to_crslab_config(opt, "0" if self.cuda else "-1")
        started = time.perf_counter()
        self.dataset = get_dataset(self.crs, "nltk", False, False)
        self.loaders = [get_dataloader(self.crs, split, self.dataset.vocab)
                        for split in (self.dataset.train_data, self.dataset.valid_data, self.dataset.test_data)]
        self.dataset_s = time.perf_counter() - started
        self.backbone = self.make_backbone()
        self.crs.opt["backbone_path"] = str(self.backbone)

    def make_backbone(self) -> Path:
        args = self.args
        arch = args.arch
        if args.backbone_path is not None:
            path = args.backbone_path.expanduser().resolve()
            if not (path / "config.json").is_file():
                raise UserError(f"--backbone-path {path}: not a saved Hugging Face model folder (no config.json)")
            self.arch = f"local folder {path}"
            return path
        if arch is None:
            arch = "bert-base" if self.cuda else ("minilm" if (MINILM / "config.json").is_file() else "tiny")
            if arch == "tiny":
                self.notes.append(f"no all-MiniLM-L6-v2 at {MINILM}: the built-in tiny BERT is used")
        self.arch = arch
        if arch == "minilm":
            if not (MINILM / "config.json").is_file():
                raise UserError(f"--arch minilm: no model at {MINILM}; run ../shared/models/get-minilm.sh or use "
                                f"--arch tiny")
            return MINILM
        from lotcrs_plugin.model.backbones.tiny import materialize_tiny

        if arch == "tiny":
            return materialize_tiny("tiny-bert", self.dataset.vocab, self.root / "data" / "model" / "builtin")
        return self.bert_base(self.root / "bert-base")

    def bert_base(self, folder: Path) -> Path:
        """BertConfig() defaults (12 layers, hidden 768, 30522 tokens), random weights (seed 0),
        with all-MiniLM-L6-v2's tokenizer (BERT-base's uncased vocabulary) when it is there, else
        a WordPiece vocabulary of the dataset's words padded to 30522 entries."""
        import torch
        from transformers import BertConfig, BertForMaskedLM, BertTokenizer

        from lotcrs_plugin.model.backbones.tiny import tiny_vocabulary

        config = BertConfig()
        if (MINILM / "vocab.txt").is_file():
            tokenizer = BertTokenizer(str(MINILM / "vocab.txt"), do_lower_case=True)
            self.tokenizer_source = f"all-MiniLM-L6-v2's vocab.txt ({MINILM})"
        else:
            words = tiny_vocabulary(self.dataset.vocab)[: config.vocab_size]
            words += [f"[unused{i}]" for i in range(config.vocab_size - len(words))]
            tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
            self.tokenizer_source = "WordPiece of the dataset's words, padded to 30522"
        if len(tokenizer) != config.vocab_size:
            raise RuntimeError(f"bert-base tokenizer has {len(tokenizer)} tokens, the config {config.vocab_size}")
        tokenizer.save_pretrained(folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            BertForMaskedLM(config).save_pretrained(folder)
        return folder

    # -- 2-3. pre-training and CRSLab's BERT recommender, interleaved on the same sequences

    def prepare_pretrain(self) -> dict[str, Any]:
        """LOTCRSPretrainSystem with its data and optimizer; its batches, step and FLOPs count."""
        from crslab.config.config import Config

        from lotcrs_plugin.system import pretrain as pt

        sub = Config.__new__(Config)
        sub.opt = dict(self.crs.opt)
        sub.opt.update(model=pt.MODEL_NAME, model_name=pt.MODEL_NAME)
        system = pt.LOTCRSPretrainSystem(sub, *self.loaders, self.dataset.vocab, self.dataset.side_data)
        started = time.perf_counter()
        data = system.data("train")
        build_s = time.perf_counter() - started
        system.build_optim()
        model, cfg = system.model, system.cfg
        bb = model.backbone
        dims = encoder_dims(bb.model)
        self.dims, self.vocab_size, self.n_items = dims, bb.vocab_size, bb.n_items
        self.unk_id = int(bb.tokenizer.unk_token_id)
        projection = dims["hidden"] ** 2 if model.projection is not None else 0
        head_rows = bb.vocab_size + dims["hidden"]  # MLM head: H x H transform + H x V decoder per position

        def batches() -> Iterator[Any]:
            epoch = 0
            while True:
                yield from system.loader("train", system.sampler("train", epoch))
                epoch += 1

        def count(batch) -> dict[str, float]:
            n = {"samples": 0.0, "examples": 0.0, "tokens": 0.0, "flops": 0.0}
            if batch.dmp is not None:
                b, w = batch.dmp.input_ids.shape
                # positions the MLM head scores: the keyword spans drawn, mlm_probability of them (expected)
                scored = cfg.mlm_probability * float(batch.dmp.keyword_mask.sum())
                n["samples"] += b
                n["examples"] += b
                n["tokens"] += b * w
                n["flops"] += encoder_train_flops(dims, b, w, head_rows=head_rows, head_positions=int(scored))
            if batch.cca is not None:
                b, w = batch.cca.input_ids.shape
                n["samples"] += b
                n["examples"] += b / 2
                n["tokens"] += b * w
                n["flops"] += encoder_train_flops(dims, b, w, extra_dense_per_sequence=projection)
            return n

        def step(batch) -> None:
            system.step(batch)
            system.optimizer_step()

        model.train()
        extra = {"sample_build_s": build_s, "dmp_samples": len(data.dmp), "bf16": bool(system.autocast),
                 "parameters": sum(p.numel() for p in model.parameters())}
        return {"system": system, "batches": batches(), "count": count, "step": step, "extra": extra}

    def prepare_crslab_bert(self) -> dict[str, Any]:
        """CRSLab's BERT recommender as the baseline configs run it (rec_model: BERT, tokenize bert,
        pretrained_path: the same backbone folder), its optimizer as TGReDialSystem.train_recommender
        builds it; a pre-training batch becomes its batches of the same rows."""
        import torch

        from lotcrs_plugin import config as run_config
        from lotcrs_plugin.runner import _build_system

        args = self.args
        opt = {"dataset": args.dataset, "tokenize": {"rec": "bert"}, "pretrained_path": {"bert": str(self.backbone)},
               "rec_model": "BERT", "context_truncate": args.seq, "item_truncate": 100, "evaluator": "rec",
               "seed": 0, "rec": {"epoch": 1, "batch_size": args.batch, "optimizer": {"name": "AdamW", "lr": 1e-3},
                                  "lr_bert": 5e-5}}
        if "synthetic" in self.opt:
            opt["synthetic"] = dict(self.opt["synthetic"])
        opt = run_config.validate(opt, where="speed.py (CRSLab BERT)")
        run_config.check_names(opt, where="speed.py (CRSLab BERT)")
        crs = run_config.to_crslab_config(opt, "0" if self.cuda else "-1")
        system = _build_system(crs, False, False, False, False, False, False)
        rec = system.rec_model
        inner = rec.module if isinstance(rec, torch.nn.DataParallel) else rec
        # TGReDialSystem.train_recommender's parameter groups: the encoder at lr_bert, the rest at lr
        bert_names = {"bert." + n for n, _ in inner.bert.named_parameters()}
        params = [{"params": [p for _, p in inner.bert.named_parameters()], "lr": system.rec_optim_opt["lr_bert"]},
                  {"params": [p for n, p in inner.named_parameters() if n not in bert_names]}]
        system.init_optim(json.loads(json.dumps(system.rec_optim_opt)), params)  # init_optim pops from its block
        dims = encoder_dims(inner.bert)
        n_entity = int(inner.item_size)
        vocab = int(inner.bert.config.vocab_size)
        items = torch.tensor(system.item_ids, dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        unused = torch.zeros(1, dtype=torch.long)

        def as_crslab(tokens, rows: slice) -> tuple:
            ids = tokens.input_ids[rows]
            ids = ids.masked_fill(ids >= vocab, self.unk_id)  # item tokens: not in CRSLab's BERT vocabulary
            y = items[torch.randint(len(items), (ids.shape[0],), generator=g)]
            # TGReDial's rec batch: context, mask, input_ids, target_pos, input_mask, sample_negs, y;
            # BERTModel reads context, mask and y only
            return (ids, tokens.attention_mask[rows], unused, unused, unused, unused, y)

        def convert(batch) -> list[tuple]:
            """The DMP rows, the CCA anchors, the CCA positives: batches of B rows each."""
            out = []
            if batch.dmp is not None:
                out.append(as_crslab(batch.dmp, slice(None)))
            if batch.cca is not None:
                half = batch.cca.input_ids.shape[0] // 2
                out += [as_crslab(batch.cca, slice(0, half)), as_crslab(batch.cca, slice(half, None))]
            return out

        def count(group: list[tuple]) -> dict[str, float]:
            n = {"samples": 0.0, "tokens": 0.0, "flops": 0.0}
            for c in group:
                b, w = c[0].shape
                n["samples"] += b
                n["tokens"] += b * w
                # pooler (H x H) and the item layer (H x n_entity) on the [CLS] state of each row
                n["flops"] += encoder_train_flops(dims, b, w, head_rows=n_entity, head_positions=b,
                                                  extra_dense_per_sequence=dims["hidden"] ** 2)
            return n

        def step(group: list[tuple]) -> None:
            for c in group:
                system.step(c, "rec", "train")

        extra = {"parameters": sum(p.numel() for p in inner.parameters()), "precision": "fp32"}
        return {"system": system, "convert": convert, "count": count, "step": step, "extra": extra}

    def pretrain_and_crslab(self) -> dict[str, dict]:
        """Both trained in alternation, block by block (``rounds`` blocks): a block of LOT-CRS
        micro-batches (their DataLoader included), then CRSLab's BERT on the same rows. A machine
        whose load drifts slows both alike, so the ratio holds."""
        lot = self.prepare_pretrain()
        base = self.prepare_crslab_bert()
        for _ in range(self.warmup):
            batch = next(lot["batches"])
            lot["step"](batch)
            base["step"](base["convert"](batch))
        rounds = min(self.rounds, self.steps)
        sizes = [self.steps // rounds + (1 if r < self.steps % rounds else 0) for r in range(rounds)]
        seconds = {"lot": 0.0, "base": 0.0}
        totals: dict[str, dict[str, float]] = {"lot": {}, "base": {}}
        for size in sizes:
            with Timer(self.device) as t:
                taken = []
                for _ in range(size):
                    batch = next(lot["batches"])
                    lot["step"](batch)
                    taken.append(batch)
            seconds["lot"] += t.seconds
            groups = [base["convert"](b) for b in taken]  # built before the clock starts
            with Timer(self.device) as t:
                for group in groups:
                    base["step"](group)
            seconds["base"] += t.seconds
            for key, side, items in (("lot", lot, taken), ("base", base, groups)):
                for item in items:
                    for k, v in side["count"](item).items():
                        totals[key][k] = totals[key].get(k, 0.0) + v
        out = {}
        for key, side, name in (("lot", lot, "pretrain"), ("base", base, "crslab_bert")):
            r = self.rates(totals[key], seconds[key])
            r.update(side["extra"], rounds=rounds, mean_width=r["tokens"] / r["samples"])
            out[name] = r
        out["crslab_bert"]["crslab_batches_per_step"] = len(groups[-1])
        del lot, base
        release(self.cuda)
        return out

    def rates(self, totals: dict[str, float], seconds: float) -> dict[str, Any]:
        """Totals of the timed steps, their rates per second and the MFU."""
        out: dict[str, Any] = {"steps": self.steps, "seconds": seconds, "step_s": seconds / self.steps}
        for k, v in totals.items():
            out[k] = v
            if k != "flops":
                out[f"{k}_s"] = v / seconds
        out["mfu"] = mfu(totals.get("flops", 0.0), seconds, self.peak)
        return out

    # -- 4-6. LOT-CRS fine-tuning system: store, retrieval, fine-tuning, evaluation

    def lotcrs_system(self) -> None:
        from crslab.system import get_system

        self.system = get_system(self.crs, *self.loaders, self.dataset.vocab, self.dataset.side_data)
        started = time.perf_counter()
        self.system.data("train")
        self.finetune_build_s = time.perf_counter() - started

    def store(self) -> dict:
        system = self.system
        started = time.perf_counter()
        sim = system.data("simulated")
        samples_s = time.perf_counter() - started
        with Timer(self.device) as t:
            store = system.build_store()
        return {"entries": len(store), "items": int(len(store.unique_items)), "seconds": t.seconds,
                "entries_s": len(store) / t.seconds, "simulated_samples": len(sim),
                "sample_build_s": samples_s, "index": system.retrieval_cfg.index}

    def retrieval(self) -> dict:
        import torch

        system, model = self.system, self.system.model
        model.eval()
        queries = []
        with torch.no_grad(), system._autocast():
            for batch in system.batches(system.data("test"), train=False):
                keys, _ = model.store_entries(batch.to(self.device).tokens)
                queries.append(keys.float())
        store = model.store
        store.search(queries[0])  # warm-up: threads, device caches
        n, i = 0, 0
        with Timer(self.device) as t:
            while n < self.args.queries:
                q = queries[i % len(queries)]
                store.search(q)
                n += q.shape[0]
                i += 1
        model.train()
        return {"queries": n, "seconds": t.seconds, "queries_s": n / t.seconds, "top_k": store.config.top_k,
                "entries": len(store), "batch": self.args.eval_batch}

    def finetune(self) -> dict:
        system = self.system
        model = system.model
        system.build_optim()
        dims = encoder_dims(model.backbone.model)
        head_rows = model.backbone.n_items + dims["hidden"]  # the head's H x H transform + the item rows
        train = system.data("train")

        def batches() -> Iterator[Any]:
            epoch = 0
            while True:
                yield from system.batches(train, train=True, epoch=epoch)
                epoch += 1

        def count(batch) -> dict[str, float]:
            b, w = batch.tokens.input_ids.shape
            return {"samples": b, "tokens": b * w,
                    "flops": encoder_train_flops(dims, b, w, head_rows=head_rows, head_positions=b)}

        def step(batch) -> None:
            system.step(batch, "rec", "train")
            system.optimizer_step()

        model.train()
        out = self.timed_loop(batches(), step, count)
        out.update({"train_samples": len(train), "sample_build_s": self.finetune_build_s,
                    "retrieval": model.uses_retrieval, "bf16": bool(system.autocast),
                    "mean_width": out["tokens"] / out["samples"]})
        return out

    def evaluation(self) -> dict:
        system = self.system
        test = system.data("test")
        with Timer(self.device) as t:
            system.evaluate("test")
        return {"samples": len(test), "items": len(system.model.items), "seconds": t.seconds,
                "samples_s": len(test) / t.seconds, "retrieval": system.model.uses_retrieval}

    # -- everything

    def run(self) -> None:
        self.part("simulator", self.simulator)
        if self.missing["crslab"]:
            for name in PARTS[1:]:
                self.skip(name, f"needs crslab, which lotcrs_plugin.system imports ({self.missing['crslab']})")
            return
        self.crslab_data()
        self.part("pretrain", self.pretrain_and_crslab, ("crslab",), several=True)
        self.lotcrs_system()
        self.part("store", self.store, ("crslab", "faiss"))
        self.part("retrieval", self.retrieval, ("crslab", "faiss", "store"))
        if self.missing["faiss"]:
            self.notes.append("fine-tuning and evaluation ran without retrieval (no faiss)")
        self.part("finetune", self.finetune, ("crslab",))
        self.part("evaluation", self.evaluation, ("crslab",))

    def report(self) -> dict:
        import torch
        import transformers

        r = self.results
        if "pretrain" in r and "crslab_bert" in r:
            r["ratio"] = {"samples": r["pretrain"]["samples_s"] / r["crslab_bert"]["samples_s"],
                          "tokens": r["pretrain"]["tokens_s"] / r["crslab_bert"]["tokens_s"]}
        r["memory"] = {"peak_rss_mb": peak_rss_mb()}
        if self.cuda:
            peaks = [v["cuda_peak_mb"] for v in r.values() if isinstance(v, dict) and "cuda_peak_mb" in v]
            r["memory"]["cuda_peak_mb"] = max(peaks) if peaks else torch.cuda.max_memory_allocated(self.device) / 2**20
        device = {"type": self.device.type, "name": self.device_name, "kind": device_kind(self.device_name,
                                                                                          self.device.type),
                  "peak_flops": self.peak, "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                  "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        if self.cuda:
            device.update(cuda=torch.version.cuda, tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
        if not self.missing["crslab"]:
            from importlib.metadata import PackageNotFoundError, version

            try:
                device["crslab"] = version("crslab")
            except PackageNotFoundError:  # importable from a source tree without metadata
                device["crslab"] = "(no version metadata)"
        if not self.missing["faiss"]:
            import faiss

            device["faiss"] = faiss.__version__
        a = self.args
        setup = {"dataset": a.dataset, "folder": str(self.folder), "per_item": a.per_item, "batch": a.batch,
                 "eval_batch": a.eval_batch, "max_length": a.seq, "steps": self.steps, "warmup": self.warmup,
                 "arch": getattr(self, "arch", None), "backbone": str(getattr(self, "backbone", "")) or None,
                 "dims": getattr(self, "dims", None), "vocab_size": getattr(self, "vocab_size", None),
                 "n_items": getattr(self, "n_items", None), "crslab_dataset_s": getattr(self, "dataset_s", None)}
        if a.dataset == "synthetic":
            setup.update(items=a.items, conversations=a.conversations)
        if hasattr(self, "tokenizer_source"):
            setup["tokenizer"] = self.tokenizer_source
        omp = os.environ.get("OMP_NUM_THREADS")
        command = ((f"OMP_NUM_THREADS={omp} " if omp else "") + "python benchmarks/speed.py"
                   + "".join(" " + shlex.quote(x) for x in self.argv))
        return {"command": command, "device": device, "setup": setup, "results": r, "skipped": self.skipped,
                "notes": self.notes}


# ---- the report ------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(rep: dict) -> str:
    d, s, r = rep["device"], rep["setup"], rep["results"]
    if d["type"] == "cuda":
        dev = (f"{d['name']}, CUDA {d.get('cuda')}, peak {d['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense"
               if d.get("peak_flops") else f"{d['name']}, CUDA {d.get('cuda')}, no peak known (give --peak)")
        dev += f", TF32 matmul {'on' if d.get('tf32_matmul') else 'off'}"
    else:
        dev = f"{d['name']}, {d['cpus']} logical CPUs, {d['torch_threads']} torch thread(s)"
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
    for key, label in (("pretrain", "LOT-CRS pre-training"), ("crslab_bert", "CRSLab BERT recommender"),
                       ("finetune", "LOT-CRS fine-tuning")):
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
        else:
            detail += (f"; {x['train_samples']} training samples, retrieval {'on' if x['retrieval'] else 'off'}, "
                       f"{'bf16 autocast' if x['bf16'] else 'fp32'}; mean width {x['mean_width']:.0f}")
        if cuda:
            detail += f"; peak {_f(x['cuda_peak_mb'], 0)} MB"
        lines.append(f"| {label} | {_f(x['samples_s'])} samples/s | {detail} |")
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
    together = "pre-training and CRSLab's BERT held together while they alternate"
    mem += (f" CUDA max allocated {_f(m['cuda_peak_mb'], 0)} MB ({together}) |" if "cuda_peak_mb" in m
            else f" the whole process ({together}) |")
    lines.append(mem)
    rounds = r.get("pretrain", {}).get("rounds")
    lines += ["", "How it is measured: one process, the parts in the order above, on the same dataset. A sample is "
              "one encoder input sequence (a DMP context, each side of a CCA pair, a recommendation context). "
              "CRSLab's BERT recommender (TGReDialSystem.step: forward, backward, its optimizer step with the "
              "gradient norm) runs on the very sequences of the timed pre-training micro-batches, in batches of "
              "the same size and width (item tokens as [UNK]); it is timed without batch building, LOT-CRS with "
              f"its DataLoader; the two alternate in {rounds or '-'} block(s) of the timed steps, so that a change "
              "of the machine's load hits both. MFU = model FLOPs / time / peak, model FLOPs per step = 6 N per token (N: the "
              "dense encoder weights, embeddings excluded) + 12 L H T per token (attention, T the padded width) "
              "+ 6 H V per position scored by an output head (MLM head over the vocabulary at the expected masked "
              "keyword positions, verbaliser over the items, CRSLab's item layer over the entities), as "
              "benchmarks/_common.py computes it; padded positions count. Fine-tuning runs without the "
              "label-smoothness teacher (its KL term is a lookup); its fusion and retrieval-loss FLOPs are left out "
              "of MFU. Pre-training and fine-tuning use their systems' own settings otherwise (AdamW, clipping, "
              "bf16 autocast on CUDA); CRSLab's BERT runs as CRSLab runs it (fp32, its MFU against the same bf16 "
              "peak).", ""]
    if not cuda:
        lines += ["On a GPU: `python benchmarks/speed.py --device cuda --arch bert-base` (BERT-base from BertConfig(), "
                  "bf16 autocast, MFU against the GPU's dense bf16 peak) writes speed_<gpu>.md; on the lent GPU "
                  "machines, which lack crslab and faiss, benchmarks/gpu_wheels.sh prepares the wheels to carry.", ""]
    return "\n".join(lines)


def default_out(kind: str) -> Path:
    return REPO / "benchmarks" / "results" / f"speed_{kind}.md"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; write the Markdown and JSON results; return the JSON's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    saved_env = {k: os.environ.get(k) for k in ("LOTCRS_HOME", "CUDA_VISIBLE_DEVICES")}
    bench = SpeedRun(args, argv)
    logger = hf_logging = hf_verbosity = None
    if not args.verbose:  # the parts' INFO lines and load reports would bury the results
        from transformers.utils import logging as hf_logging

        hf_verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            from loguru import logger

            for name in ("crslab", "lotcrs_plugin"):
                logger.disable(name)
        except ImportError:
            logger = None
    try:
        with tempfile.TemporaryDirectory(prefix="lotcrs_speed_") as tmp:
            try:
                bench.setup(Path(tmp))
                bench.run()
            finally:
                bench.__dict__.pop("system", None)  # free the models before the temporary root goes
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                bench.restore()
        rep = bench.report()
    finally:
        if logger is not None:
            for name in ("crslab", "lotcrs_plugin"):
                logger.enable(name)
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_verbosity)
            hf_logging.enable_progress_bar()
    out = args.out or default_out(rep["device"]["kind"])
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(rep)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=str) + "\n", encoding="utf-8")
    print(text)
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return rep


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
