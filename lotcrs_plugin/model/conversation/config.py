"""The ``conversation:`` block: the response generator of the LOT-CRS system (its defaults: the
authors' conversation stage, DialoGPT-small fine-tuned for 10 epochs at lr 1e-4, batch 8, with
the responses of the 10 nearest simulated contexts as a prompt)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lotcrs_plugin.config_block import requirement, typed_values
from lotcrs_plugin.errors import UserError

BLOCK = "conversation"
DECODINGS = ("greedy", "beam", "top_p")
TRAIN_ITEMS = ("gold", "recommended")
# generation metrics that a validation pass can select on (maximised); ppl is minimised
SELECT_METRICS = ("ppl", "bleu@1", "bleu@2", "dist@1", "dist@2", "dist@3", "dist@4", "item_share")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ConversationConfig:
    """enabled: run the stage (after the recommender's test) and converse in --interact.
    backbone_path: a causal LM for AutoModelForCausalLM / AutoTokenizer, a Hugging Face name or a
    local folder (the paper: microsoft/DialoGPT-small). k: simulated contexts whose responses form
    the retrieved prompt (the memory store's nearest entries to the real context).
    retrieved_prompt / recommended_item: the two parts of the prompt (false: the ablations "no
    retrieved prompt", "no recommended item"; the <movie> slot is filled with the recommender's
    item either way, so that response and recommendation agree). train_item: the item in the
    training prompt: gold (the item the response names, else the recommender's) | recommended (always
    the recommender's, as at test). epochs, lr, batch_size, eval_batch_size, weight_decay,
    warmup_ratio, max_grad_norm: fine-tuning (AdamW, linear schedule). max_context_length,
    max_prompt_length, max_response_length: tokens of the dialog context (cut from the left), of the
    retrieved responses (cut from the right), of the response (cut from the right).
    decoding: greedy | beam (num_beams) | top_p (nucleus sampling with top_p and temperature);
    max_new_tokens, min_new_tokens: the longest and shortest reply (the end-of-text token is barred before
    min_new_tokens: a reply is never empty). select: the validation score of the kept epoch: ppl
    (minimised; cheap) or a generation metric (maximised; every epoch generates on validation).
    max_train_batches, max_eval_samples: caps for quick checks (0: all). run_name: folder under
    <root>/save (default: <lotcrs.run_name>_conv). seed: -1 = the top-level seed. bf16: autocast
    where it pays (as lotcrs.bf16). log_every: optimizer steps between log lines.
    """

    enabled: bool = False
    backbone_path: str = "microsoft/DialoGPT-small"
    k: int = 10
    retrieved_prompt: bool = True
    recommended_item: bool = True
    train_item: str = "gold"
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 8
    eval_batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_context_length: int = 256
    max_prompt_length: int = 256
    max_response_length: int = 64
    decoding: str = "greedy"
    num_beams: int = 4
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 40
    min_new_tokens: int = 1
    select: str = "ppl"
    max_train_batches: int = 0
    max_eval_samples: int = 0
    run_name: str = ""
    seed: int = -1
    bf16: bool = True
    log_every: int = 50

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ConversationConfig":
        """Validate a block; UserError names an unknown key, a wrong type or a bad value."""
        cfg = cls(**typed_values(cls, d))
        cfg.check()
        return cfg

    def check(self) -> None:
        need = requirement(self)

        need(self.decoding in DECODINGS, "decoding", " or ".join(DECODINGS))
        need(self.train_item in TRAIN_ITEMS, "train_item", " or ".join(TRAIN_ITEMS))
        need(self.select in SELECT_METRICS, "select", "one of " + ", ".join(SELECT_METRICS))
        for key in ("k", "epochs", "batch_size", "eval_batch_size", "num_beams", "max_new_tokens", "log_every"):
            need(getattr(self, key) >= 1, key, "at least 1")
        for key in ("max_train_batches", "max_eval_samples", "weight_decay", "max_grad_norm", "min_new_tokens"):
            need(getattr(self, key) >= 0, key, "0 or more")
        for key in ("max_context_length", "max_response_length"):
            need(getattr(self, key) >= 8, key, "at least 8")
        need(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", f"at most max_new_tokens ({self.max_new_tokens})")
        need(self.max_prompt_length >= 0, "max_prompt_length", "0 or more")
        need(self.lr > 0, "lr", "positive")
        need(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        need(self.temperature > 0, "temperature", "positive")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        need(self.seed >= -1, "seed", "-1 (the run's seed) or a non-negative integer")
        check_model_path(self.backbone_path)


def check_model_path(value: str, key: str = "backbone_path") -> None:
    """A local folder that exists, or a string that reads as a Hugging Face name (whether the hub
    has it is known only when it is downloaded): a missing folder is named now, not by the hub."""
    right = "give an existing model folder or a Hugging Face name like microsoft/DialoGPT-small"
    if not value.strip():
        raise UserError(f"key '{key}' is empty; {right}")
    folder = Path(os.path.expanduser(value))
    if folder.is_dir():
        return
    if folder.exists():
        raise UserError(f"key '{key}': '{value}' is a file, not a model folder; {right}")
    path_like = value.startswith(("/", "~", ".")) or "\\" in value or value.count("/") > 1
    if path_like or not _HUB_NAME.match(value):
        raise UserError(f"key '{key}': no folder '{value}' (looked for {folder.absolute()}); {right}")


__all__ = ["BLOCK", "ConversationConfig", "DECODINGS", "SELECT_METRICS", "TRAIN_ITEMS", "check_model_path"]
