"""The ``lotcrs_pretrain:`` block: DMP + CCA pre-training (:class:`PretrainConfig`), read by
lotcrs_plugin.model.pretrain and lotcrs_plugin.system.pretrain (and by the fine-tuning system,
which runs pre-training as its first stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lotcrs_plugin.config_block import requirement, typed_values, wrong
from lotcrs_plugin.data.pretrain_samples import DMP_MODES
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones import DEFAULT_PROMPT, POOLINGS
from lotcrs_plugin.model.cpu_dropout import CPU_DROPOUTS

BLOCK = "lotcrs_pretrain"
DATA_SOURCES = ("simulated", "train")
SIMILARITIES = ("cosine", "dot")


def _check_projection(key: str, value: Any) -> Any:
    if not (isinstance(value, bool) or value == "auto"):
        raise wrong(key, value, "true, false or auto")
    return value


@dataclass(frozen=True)
class PretrainConfig:
    """The ``lotcrs_pretrain:`` block (defaults from the LOT-CRS paper and authors' code).

    data: dialogs to pre-train on, simulated | train. epochs / max_steps: passes over the data /
    stop after this many optimizer steps (0: no limit; the schedule still spans all epochs).
    lr, weight_decay, warmup_ratio: AdamW and a linear warmup/decay schedule. batch_size: DMP
    samples per micro-batch; cca_batch_size: CCA pairs per micro-batch (0: batch_size);
    grad_accumulation: micro-batches per optimizer step (effective batch 16 x 4 = 64, also over
    several processes: lotcrs_plugin.system.distributed);
    max_grad_norm: clipping (0: off). adam_eps: AdamW's denominator floor. mlm_probability: chance a keyword span is masked.
    temperature, similarity: InfoNCE. dmp_weight, cca_weight: loss weights (0 turns a task off:
    the paper runs DMP, then CCA from the DMP checkpoint). pooling: the CCA representation, cls |
    mean | first_last ('' = the backbone's default); projection: SimCSE MLP while training,
    true | false | auto (the backbone's default: on for bert). max_length: tokens per input,
    cut from the left. prompt: appended to CCA contexts. dmp_samples: prefixes | dialogs.
    pad_to_multiple_of: dynamic padding granularity. bucket_pool: length-bucketed batches, pools of
    this many batches sorted by length, the batches then shuffled (0 or 1: off, the order of earlier versions;
    lotcrs_plugin.data.length_buckets). num_workers: DataLoader processes. bf16:
    autocast where the device runs it fast (CUDA; a CPU with AVX512_BF16 or AMX), fp32 elsewhere. checkpoint_every: steps between checkpoints (0: epoch ends
    only). resume: continue from the run's checkpoint. run_name: folder under <root>/save.
    tensorboard: scalars under <root>/runs/<run name>. log_every: steps between log lines.
    eval_max_batches: validation/test batches (0: all). seed: -1 uses the top-level seed. threads:
    torch's CPU threads while fit() runs (0: torch's default, the same whatever the load; -1: the
    free cores, load-dependent: lotcrs_plugin.hardware.training_threads).
    """

    data: str = "simulated"
    epochs: int = 2
    max_steps: int = 0
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    batch_size: int = 16
    cca_batch_size: int = 0
    grad_accumulation: int = 4
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8
    mlm_probability: float = 0.9
    temperature: float = 0.05
    similarity: str = "cosine"
    dmp_weight: float = 1.0
    cca_weight: float = 1.0
    pooling: str = ""
    projection: Any = "auto"
    max_length: int = 128
    prompt: str = DEFAULT_PROMPT
    dmp_samples: str = "prefixes"
    pad_to_multiple_of: int = 8
    # 1.48x pre-training samples/s on INSPIRED (benchmarks/results/speed_cpu.md); off until a validation
    # run shows the same quality with it (the result tables ran with 0)
    bucket_pool: int = 0
    num_workers: int = 0
    bf16: bool = True
    # fast: CPU dropout masks from one 64-bit draw per eight elements, p rounded to 1/256
    # (lotcrs_plugin.model.cpu_dropout; 1.79x MiniLM's pre-training samples/s here); native: torch's
    cpu_dropout: str = "fast"
    # the encoder's token-wise layers on the real tokens only, exact (model/backbones/packed_bert.py;
    # BERT-family backbones; 1.43x samples/s on INSPIRED, benchmarks/results/speed_cpu.md)
    packed_tokens: bool = True
    checkpoint_every: int = 500
    resume: bool = False
    run_name: str = ""
    tensorboard: bool = False
    log_every: int = 50
    eval_max_batches: int = 100
    seed: int = -1
    threads: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "PretrainConfig":
        """Validate a block; UserError names an unknown key, a wrong type or a bad value."""
        d = typed_values(cls, d, {"projection": _check_projection})
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        need = requirement(self)

        need(self.cpu_dropout in CPU_DROPOUTS, "cpu_dropout", " or ".join(CPU_DROPOUTS))
        need(self.data in DATA_SOURCES, "data", " or ".join(DATA_SOURCES))
        need(self.similarity in SIMILARITIES, "similarity", " or ".join(SIMILARITIES))
        need(self.pooling in ("", *POOLINGS), "pooling",
             "one of " + ", ".join(POOLINGS) + " (or '' for the backbone's)")
        need(self.dmp_samples in DMP_MODES, "dmp_samples", " or ".join(DMP_MODES))
        for key in ("epochs", "batch_size", "grad_accumulation", "pad_to_multiple_of"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("max_steps", "cca_batch_size", "num_workers", "checkpoint_every", "eval_max_batches",
                    "bucket_pool"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.threads >= -1, "threads", "a count, 0 (torch's default) or -1 (the free cores)")
        need(self.log_every >= 1, "log_every", "at least 1")
        need(self.max_length >= 8, "max_length", "at least 8")
        need(0.0 < self.mlm_probability <= 1.0, "mlm_probability", "in (0, 1]")
        need(self.temperature > 0, "temperature", "positive")
        need(self.lr > 0, "lr", "positive")
        need(self.adam_eps > 0, "adam_eps", "positive")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        for key in ("weight_decay", "max_grad_norm", "dmp_weight", "cca_weight"):
            need(getattr(self, key) >= 0, key, "0 or more")
        need(self.dmp_weight > 0 or self.cca_weight > 0, "dmp_weight", "positive when cca_weight is 0")
        need(self.seed >= -1, "seed", "-1 (the run's seed) or a non-negative integer")
        if "[MASK]" not in self.prompt:
            raise UserError(f"key 'prompt' must contain [MASK], not {self.prompt!r}")

    @property
    def pairs_per_batch(self) -> int:
        return self.cca_batch_size or self.batch_size


__all__ = ["BLOCK", "DATA_SOURCES", "SIMILARITIES", "PretrainConfig"]
