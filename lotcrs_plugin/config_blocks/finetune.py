"""The ``lotcrs:`` block: the LOT-CRS pipeline's stages and fine-tuning (:class:`FinetuneConfig`),
read by lotcrs_plugin.model.lotcrs and lotcrs_plugin.system.lotcrs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lotcrs_plugin.config_block import requirement, typed_values
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones import DEFAULT_PROMPT, POOLINGS
from lotcrs_plugin.model.cpu_dropout import CPU_DROPOUTS
from lotcrs_plugin.model.sample_rankers import RANKERS

BLOCK = "lotcrs"
STORE_REFRESH = ("fixed", "epoch")


@dataclass(frozen=True)
class FinetuneConfig:
    """The ``lotcrs:`` block (defaults: the paper and the authors' code).

    pretrain: run pre-training first (the ``lotcrs_pretrain:`` block); false: use backbone_path as
    it is (raw model = ablation "no pre-training"; a pre-training export = a pre-trained checkpoint).
    retrieval: memory store + fusion (false: ablation "no retrieval"). store_refresh: fixed (built
    once with the pre-trained backbone) | epoch (recomputed with the fine-tuned one after each epoch).
    epochs, batch_size, grad_accumulation (effective batch = batch_size x grad_accumulation, also over
    several processes: lotcrs_plugin.system.distributed), lr,
    weight_decay, warmup_ratio (linear warmup then linear decay), max_grad_norm (0: no clipping),
    adam_eps (AdamW's denominator floor): fine-tuning. eval_batch_size: validation, test, store and teacher passes. eval_chunk_elements: the
    most item scores validation and test hold at once (samples x items per chunk; the catalog is
    ranked chunk by chunk, lotcrs_plugin.evaluator.ranking). impatience: stop after
    this many epochs without a better validation score (0: never). max_length: tokens per input, cut
    from the left (the prompt stays). prompt: appended to every context, with [MASK] once.
    pooling: the context representation of store keys and queries ('' = lotcrs_pretrain.pooling,
    else the backbone's default: the space CCA shaped). teacher_epochs, teacher_lr,
    teacher_max_samples (0: all): training of the label-smoothness teacher (teacher_epochs 0 uses the
    pre-trained model as it is). max_train_batches: batches per epoch (0: all; for quick checks). pad_to_multiple_of:
    dynamic padding granularity. bucket_pool: length-bucketed training batches, pools of this many
    batches sorted by length, the batches then shuffled (0 or 1: off, the order of earlier versions;
    lotcrs_plugin.data.length_buckets).
    num_workers: DataLoader processes. bf16: autocast where the device runs it fast (CUDA; a CPU with
    AVX512_BF16 or AMX: lotcrs_plugin.hardware), fp32 elsewhere.
    resume: continue from the run's checkpoint. run_name: folder under <root>/save. log_every:
    optimizer steps between log lines. seed: -1 uses the top-level seed. threads: torch's intra-op
    CPU threads while fit() runs (0: torch's default, the physical cores or OMP_NUM_THREADS, so that a
    config and seed give the same metrics whatever the load; -1: that default cut to the cores the
    load average leaves free, faster on a busy machine but load-dependent:
    lotcrs_plugin.hardware.training_threads).
    ranker: model (LOT-CRS) | popularity |
    repeat_popularity: training-free baselines on the same samples and evaluator (nothing is
    trained; lotcrs_plugin.model.sample_rankers).
    """

    pretrain: bool = True
    retrieval: bool = True
    store_refresh: str = "fixed"
    epochs: int = 15
    batch_size: int = 8
    grad_accumulation: int = 4
    eval_batch_size: int = 32
    eval_chunk_elements: int = 1 << 24
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8
    impatience: int = 3
    max_length: int = 256
    prompt: str = DEFAULT_PROMPT
    pooling: str = ""
    teacher_epochs: int = 1
    teacher_lr: float = 5e-5
    teacher_max_samples: int = 0
    max_train_batches: int = 0
    pad_to_multiple_of: int = 8
    # 1.10x fine-tuning samples/s on INSPIRED (benchmarks/results/speed_cpu.md); off until a validation
    # run shows the same quality with it (the result tables ran with 0)
    bucket_pool: int = 0
    num_workers: int = 0
    bf16: bool = True
    # fast: CPU dropout masks from one 64-bit draw per eight elements, p rounded to 1/256
    # (lotcrs_plugin.model.cpu_dropout; 1.70x MiniLM's fine-tuning samples/s here); native: torch's
    cpu_dropout: str = "fast"
    # the encoder's token-wise layers on the real tokens only, exact (model/backbones/packed_bert.py;
    # BERT-family backbones; 1.06x samples/s on INSPIRED, benchmarks/results/speed_cpu.md)
    packed_tokens: bool = True
    resume: bool = False
    run_name: str = ""
    log_every: int = 50
    seed: int = -1
    threads: int = 0
    ranker: str = "model"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FinetuneConfig":
        """Validate a block; UserError names an unknown key, a wrong type or a bad value."""
        d = typed_values(cls, d)
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        need = requirement(self)

        need(self.store_refresh in STORE_REFRESH, "store_refresh", " or ".join(STORE_REFRESH))
        need(self.cpu_dropout in CPU_DROPOUTS, "cpu_dropout", " or ".join(CPU_DROPOUTS))
        need(self.ranker in RANKERS, "ranker", "one of " + ", ".join(RANKERS))
        need(self.pooling in ("", *POOLINGS), "pooling", "one of " + ", ".join(POOLINGS) + " (or '')")
        for key in ("epochs", "batch_size", "grad_accumulation", "eval_batch_size", "pad_to_multiple_of",
                    "log_every", "eval_chunk_elements"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("impatience", "teacher_epochs", "teacher_max_samples", "max_train_batches", "num_workers",
                    "bucket_pool"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.threads >= -1, "threads", "a count, 0 (torch's default) or -1 (the free cores)")
        need(self.max_length >= 16, "max_length", "at least 16")
        need(self.lr > 0, "lr", "positive")
        need(self.adam_eps > 0, "adam_eps", "positive")
        need(self.teacher_lr > 0, "teacher_lr", "positive")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        for key in ("weight_decay", "max_grad_norm"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.seed >= -1, "seed", "-1 (the run's seed) or a non-negative integer")
        if self.prompt.count("[MASK]") != 1:
            raise UserError(f"key 'prompt' must contain [MASK] exactly once, not {self.prompt!r}")


__all__ = ["BLOCK", "STORE_REFRESH", "FinetuneConfig"]
