"""The reference row of benchmarks/speed.py: the fine-tuning loop a researcher writes in an
afternoon with transformers alone.

``AutoModel`` (the encoder, no head) from the same folder as LOT-CRS's backbone, mean pooling over
the attention mask, one ``nn.Linear`` over the catalog's items, cross-entropy, ``torch.optim.AdamW``;
fp32, no clipping, no autocast, no scheduler: the plain loop. It trains on the very sequences of
LOT-CRS's fine-tuning batches (same rows, same padded width); item tokens, which the plain model's
vocabulary lacks, become its [UNK] token (as in a loop that tokenizes item names as unknown words,
the compute is the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PlainRecommender(nn.Module):
    """Encoder + mean pooling + a linear layer over ``n_items``."""

    def __init__(self, path: str | Path, n_items: int):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(path))
        self.head = nn.Linear(int(self.encoder.config.hidden_size), int(n_items))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


class PlainLoop:
    """The model, its optimizer and one training step; :meth:`convert` turns a LOT-CRS
    FinetuneBatch into this loop's (input_ids, attention_mask, targets)."""

    def __init__(self, path: str | Path, n_items: int, *, lr: float = 1e-4, device: Any = "cpu", seed: int = 0):
        with torch.random.fork_rng(devices=[]):  # the head's init must not move the systems' random state
            torch.manual_seed(seed)
            self.model = PlainRecommender(path, n_items).to(device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.device = torch.device(device)
        self.vocab_size = int(self.model.encoder.config.vocab_size)
        from transformers import AutoTokenizer

        self.unk_id = int(AutoTokenizer.from_pretrained(str(path)).unk_token_id)

    def convert(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = batch.tokens.input_ids
        ids = ids.masked_fill(ids >= self.vocab_size, self.unk_id)
        return ids.to(self.device), batch.tokens.attention_mask.to(self.device), batch.targets.to(self.device)

    def step(self, item: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One step; the loss, detached (not read here: reading it would wait for a GPU)."""
        input_ids, attention_mask, targets = item
        loss = F.cross_entropy(self.model(input_ids, attention_mask), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


__all__ = ["PlainLoop", "PlainRecommender"]
