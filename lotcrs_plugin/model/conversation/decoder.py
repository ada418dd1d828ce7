"""The response generator: a causal language model through AutoModelForCausalLM and
AutoTokenizer, by Hugging Face name (microsoft/DialoGPT-small) or local folder.

The slot ``<movie>`` is added to the tokenizer as one token where the model lacks it.
Rows are left-padded (the response ends every row), so the training loss asks the model for the
logits of the last positions only (``logits_to_keep``): a 50k-token vocabulary over the whole
prompt would cost more than the rest of the model. Positions count from each row's first real
token, as ``generate`` counts them for left-padded prompts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.conversation.config import ConversationConfig
from lotcrs_plugin.model.conversation.prompt import SLOT


class ConversationDecoder(nn.Module):
    """``model`` (a causal LM) and ``tokenizer``; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise UserError("conversation.backbone_path: its tokenizer has no end-of-text token; give a GPT-2-family "
                            "model (e.g. microsoft/DialoGPT-small)")
        self.eos_id = int(eos)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConversationDecoder":
        """From a Hugging Face name or a folder (also one written by :meth:`save`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.path.expanduser(str(path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"conversation.backbone_path: cannot load a causal language model from '{path}' "
                            f"({first}); give a local folder or a Hugging Face name like "
                            f"microsoft/DialoGPT-small") from None
        if SLOT not in tokenizer.get_vocab():
            # the slot as one token (as CRSLab's vocabularies hold <movie>): the model learns one step, not
            # the three BPE pieces "<", "movie", ">"; the new row starts at the mean of the others
            tokenizer.add_tokens([SLOT])
            model.resize_token_embeddings(len(tokenizer))
        return cls(model, tokenizer)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

    def check_lengths(self, cfg: ConversationConfig, item_tokens: int = 32) -> None:
        """The longest row must fit the model's positions (UserError names the keys to lower)."""
        longest = (cfg.max_prompt_length if cfg.retrieved_prompt else 0) + cfg.max_context_length + \
            (item_tokens if cfg.recommended_item else 0) + max(cfg.max_response_length + 1, cfg.max_new_tokens)
        if self.max_positions and longest > self.max_positions:
            raise UserError(f"conversation: max_prompt_length + max_context_length + max_response_length (or "
                            f"max_new_tokens) + about {item_tokens} for the item come to {longest} tokens, more than "
                            f"the {self.max_positions} positions of {cfg.backbone_path}; lower them")

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- batches

    def left_padded(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and position_ids of rows padded on the left."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        device = self.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}

    def response_nll(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, int]:
        """(summed negative log-likelihood of the response tokens given their prompts, their count)."""
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        batch = self.left_padded(rows)
        tail = max(len(r) for r in responses)
        try:
            logits = self.model(**batch, logits_to_keep=tail + 1).logits
        except TypeError:  # a model class without logits_to_keep
            logits = self.model(**batch).logits[:, -(tail + 1):]
        targets = batch["input_ids"][:, -tail:]
        keep = torch.zeros_like(targets, dtype=torch.bool)
        for i, r in enumerate(responses):
            keep[i, tail - len(r):] = True
        labels = targets.masked_fill(~keep, -100)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
        return nll, int(keep.sum())

    # -- generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: ConversationConfig,
                 generator_seed: int | None = None) -> list[str]:
        """One reply per prompt, decoded as the config says (greedy, beam or top-p sampling)."""
        batch = self.left_padded([list(p) or [self.eos_id] for p in prompts])
        batch.pop("position_ids")  # generate derives them from the mask
        kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
                                  "pad_token_id": self.pad_id,
                                  "eos_token_id": self.eos_id}
        if cfg.decoding == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        elif cfg.decoding == "beam":
            kwargs.update(do_sample=False, num_beams=cfg.num_beams, early_stopping=True)
        else:
            kwargs.update(do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature, top_k=0)
            if generator_seed is not None:
                torch.manual_seed(generator_seed)
        was = self.model.training
        self.model.eval()
        out = self.model.generate(**batch, **kwargs)
        self.model.train(was)
        new = out[:, batch["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]


__all__ = ["ConversationDecoder"]
