"""Speed of LOT-CRS on one dataset in one process, beside CRSLab's BERT recommender and a plain
Hugging Face fine-tuning loop.

Measured, in this order, on the same data:

1. simulator: the balanced-data simulator over the dataset (uncached), conversations/s;
2. memory store: LOTCRSSystem.build_store (encode the simulated contexts, build the faiss index),
   seconds; retrieval: MemoryStore.search with the test contexts as queries, queries/s;
3. training, four loops in alternation (every step on CPU, in 5 blocks on CUDA: --rounds), so
   that a shared machine's changing load hits all of them alike (benchmarks/_alternate.py):
   - LOT-CRS pre-training: LOTCRSPretrainSystem's step (DMP + CCA micro-batch from its own
     DataLoader, ``step`` + ``optimizer_step``), samples/s, tokens/s, MFU (CUDA);
   - CRSLab's BERT recommender (``rec_model: BERT``, TGReDialSystem.step: forward, backward,
     optimizer) on the very same token sequences, in batches of the same size and width;
   - LOT-CRS fine-tuning: LOTCRSSystem's step (with the retrieval fusion and its loss only with
     --retrieval on), samples/s, MFU (CUDA);
   - the reference: a plain Hugging Face loop (benchmarks/hf_reference.py: AutoModel, mean
     pooling, a linear layer over the items, cross-entropy, AdamW, fp32) on the very sequences
     of the timed fine-tuning batches;
   and each one's ratio to the reference (and pre-training's to CRSLab's BERT);
4. evaluation: LOTCRSSystem.evaluate('test'): every test sample scored against every catalog item
   and the long-tail evaluator's report, seconds;
5. peak memory: the process's peak RSS; on CUDA also torch.cuda.max_memory_allocated per part.

The CPU's model and ISA flags (AVX-512, AVX512_BF16, AMX: lotcrs_plugin.hardware) go with every
figure: bf16 autocast is on only where the ISA runs it.

A sample is one input sequence of the encoder: a DMP context, each side of a CCA pair (a CCA pair
is two samples, its "example" one), a recommendation context. CRSLab's BERT gets the sequences of
each timed pre-training micro-batch as three batches of B (the DMP rows, the CCA anchors, the CCA
positives), item tokens replaced by [UNK] (its vocabulary has none). Its timing leaves out batch
building, LOT-CRS's includes its DataLoader. CUDA is synchronised around every timed loop; the
warm-up steps are not timed.

    python benchmarks/speed.py                                   # CPU, synthetic, MiniLM (tiny without it)
    python benchmarks/speed.py --device cuda --arch bert-base    # GPU: BERT-base from BertConfig(), bf16
    python benchmarks/speed.py --dataset redial_partial --arch minilm --steps 5
    LOTCRS_HOME=/work/lh python benchmarks/speed.py --dataset inspired_unicrs --steps 5   # an imported dataset

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
from speed_report import markdown, page_inputs  # noqa: E402

from lotcrs_plugin.errors import UserError  # noqa: E402

MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))
ARCHS = ("tiny", "minilm", "bert-base")
PARTS = ("simulator", "store", "retrieval", "pretrain", "crslab_bert", "finetune", "hf_reference", "evaluation")
SKIPPABLE = ("simulator", "store", "retrieval", "training", "evaluation")
TRAINING = ("pretrain", "crslab_bert", "finetune", "hf_reference")  # measured together, alternating


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
    p.add_argument("--skip", default="", help="comma-separated parts not to run (e.g. store,retrieval: the "
                                               "slowest set-up on a large simulation); known: " + ", ".join(SKIPPABLE))
    p.add_argument("--retrieval", choices=("on", "off"), default="off",
                   help="fine-tuning with the retrieval fusion and its loss (on, when faiss is there) or without "
                        "(off: as crslab_configs/lotcrs_inspired_cpu.yaml runs, and the plain loop's task)")
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
    args.skip = tuple(x for x in args.skip.split(",") if x)
    for part in args.skip:
        if part not in SKIPPABLE:
            raise UserError(f"--skip {part}: not a part that can be left out; known: {', '.join(SKIPPABLE)}")
    if args.retrieval == "on" and "store" in args.skip:
        raise UserError("--retrieval on fine-tunes with the memory store: do not --skip store")
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
        """Run one part unless a module or an earlier part it needs is missing, or --skip names it;
        ``several``: fn returns the results of several parts by name (measured together)."""
        if name in self.args.skip:
            return self.skip(name, "--skip")
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
            from lotcrs_plugin.data.synthetic.config import SyntheticConfig
            from lotcrs_plugin.data.synthetic.dataset import ensure_generated

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
        fusion = args.retrieval == "on" and not self.missing["faiss"]
        opt["lotcrs"] = {"run_name": "speed_lotcrs", "pretrain": False, "retrieval": fusion,
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
        extra: dict[str, Any] = {"parameters": sum(p.numel() for p in inner.parameters()), "precision": "fp32"}

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
            extra["crslab_batches_per_step"] = len(out)
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

        return {"system": system, "convert": convert, "count": count, "step": step, "extra": extra}

    def prepare_reference(self) -> dict[str, Any]:
        """The plain Hugging Face loop (benchmarks/hf_reference.py) on the fine-tuning sequences."""
        from hf_reference import PlainLoop

        loop = PlainLoop(self.backbone, len(self.system.model.items), lr=self.system.cfg.lr, device=self.device)
        dims = encoder_dims(loop.model.encoder)
        n_items = len(self.system.model.items)

        def count(item) -> dict[str, float]:
            b, w = item[0].shape
            return {"samples": b, "tokens": b * w,
                    "flops": encoder_train_flops(dims, b, w, head_rows=n_items, head_positions=b)}

        return {"convert": loop.convert, "step": loop.step, "count": count,
                "extra": {"parameters": loop.parameters(), "precision": "fp32"}}

    def training(self) -> dict[str, dict]:
        """The four training loops in alternation, block by block (``rounds`` blocks): LOT-CRS
        pre-training (its DataLoader included), CRSLab's BERT on the same rows, LOT-CRS
        fine-tuning (its DataLoader included), the plain Hugging Face loop on the same rows. A
        machine whose load drifts slows all of them alike, so the ratios hold."""
        from _alternate import Contender, alternate

        lot = self.prepare_pretrain()
        base = self.prepare_crslab_bert()
        fine = self.prepare_finetune()
        ref = self.prepare_reference()
        contenders = [
            Contender("pretrain", lot["step"], lot["count"], batches=lot["batches"]),
            Contender("crslab_bert", base["step"], base["count"], follows="pretrain", convert=base["convert"]),
            Contender("finetune", fine["step"], fine["count"], batches=fine["batches"]),
            Contender("hf_reference", ref["step"], ref["count"], follows="finetune", convert=ref["convert"]),
        ]
        rounds = min(self.rounds, self.steps)
        totals = alternate(contenders, steps=self.steps, warmup=self.warmup, rounds=rounds,
                           sync=Timer(self.device).sync)
        out = {}
        for side, name in ((lot, "pretrain"), (base, "crslab_bert"), (fine, "finetune"), (ref, "hf_reference")):
            t = dict(totals[name])
            r = self.rates(t, t.pop("seconds"))
            r.update(side["extra"], rounds=rounds, mean_width=r["tokens"] / r["samples"])
            out[name] = r
        del lot, base, fine, ref, contenders
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

    def prepare_finetune(self) -> dict[str, Any]:
        """LOTCRSSystem's fine-tuning step with its optimizer; its batches and FLOPs count."""
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
        extra = {"train_samples": len(train), "sample_build_s": self.finetune_build_s,
                 "retrieval": model.uses_retrieval, "bf16": bool(system.autocast)}
        return {"batches": batches(), "count": count, "step": step, "extra": extra}

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
        self.lotcrs_system()
        self.part("store", self.store, ("crslab", "faiss"))
        self.part("retrieval", self.retrieval, ("crslab", "faiss", "store"))
        if self.missing["faiss"] and self.args.retrieval == "on":
            self.notes.append("fine-tuning and evaluation ran without retrieval (no faiss)")
        self.part("training", self.training, ("crslab",), several=True)
        self.part("evaluation", self.evaluation, ("crslab",))

    def report(self) -> dict:
        import torch
        import transformers

        r = self.results
        if "pretrain" in r and "crslab_bert" in r:
            r["ratio"] = {"samples": r["pretrain"]["samples_s"] / r["crslab_bert"]["samples_s"],
                          "tokens": r["pretrain"]["tokens_s"] / r["crslab_bert"]["tokens_s"]}
        if "hf_reference" in r:  # every training loop against the plain Hugging Face loop
            ref = r["hf_reference"]
            r["vs_reference"] = {k: {"samples": r[k]["samples_s"] / ref["samples_s"],
                                     "tokens": r[k]["tokens_s"] / ref["tokens_s"]}
                                 for k in TRAINING if k in r}
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
        if not self.cuda:  # machines differ: some have AVX512_BF16 or AMX, some neither
            from lotcrs_plugin.hardware import cpu_info

            info = cpu_info()
            device.update(cpu=info.describe(), isa_flags=list(info.flags), bf16_fast=info.bf16_fast)
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
                 "retrieval": a.retrieval,
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
    text = markdown(rep, *page_inputs(out))  # with benchmarks/ab.py's before/after rows and the notes
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
