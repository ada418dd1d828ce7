"""The training loop that pre-training (lotcrs_plugin.system.pretrain) and fine-tuning
(lotcrs_plugin.system.finetune) share: AdamW with the linear schedule, optimizer steps over
accumulated micro-batches (also over several processes: lotcrs_plugin.system.distributed), the
running sums of the losses, and checkpoints that resume.

A checkpoint holds tensors, numbers, strings, lists and dicts only (the random states as
tensors), so it loads with ``torch.load(weights_only=True)``: a checkpoint that someone shares
cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.system.optim import adamw_linear


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary sibling, renamed over ``path`` (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint_file(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A checkpoint written with ``format: fmt``, loaded with weights_only=True (UserError names the
    file when it is another kind, or holds objects that only unpickling could make)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ...)
        raise UserError(f"{path}: not loadable as plain tensors and numbers ({type(err).__name__}); "
                        f"an older {what} holds pickled objects: delete it or set resume: false") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise UserError(f"{path}: not a LOT-CRS {what}")
    return state


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state dict (the best epoch's model, kept while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def rng_state() -> dict[str, Any]:
    """torch's random states, as tensors (the CPU generator and every CUDA device's)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LossSums:
    """Running sums of the losses of the micro-batches that count (a stand-in, scale 0, does not)."""

    def __init__(self, as_float: bool):
        self.as_float = as_float  # float() each value (a sync per micro-batch) or keep the tensors
        self.sums: dict[str, Any] = {}
        self.n = 0

    def add(self, losses: Mapping[str, Any]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0 if self.as_float else 0) + (float(v) if self.as_float else v)
        self.n += 1

    def total(self, dist: Any, reset: bool = False) -> tuple[dict[str, float], int]:
        """(sums, count) over every process; ``reset`` starts new sums."""
        sums, n = dist.sum_over_processes({k: float(v) for k, v in self.sums.items()}, self.n)
        if reset:
            self.sums, self.n = {}, 0
        return sums, n


class TrainLoop:
    """Optimizer, schedule and step count of one training run of ``model``, and its micro-batch loop."""

    def __init__(self, model: nn.Module, dist: Any, *, grad_accumulation: int, max_grad_norm: float):
        self.model = model
        self.dist = dist
        self.grad_accumulation = grad_accumulation
        self.max_grad_norm = max_grad_norm
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.global_step = 0
        self.total_steps = 0

    def build_optim(self, total_steps: int, *, lr: float, weight_decay: float, warmup_ratio: float,
                    eps: float, rates: Mapping[int, float] | None = None, fused: bool | None = None) -> None:
        """AdamW with a linear warmup and decay over ``total_steps`` (at least 1) optimizer steps."""
        total = max(1, total_steps)
        self.optimizer, self.scheduler = adamw_linear(self.model, lr=lr, weight_decay=weight_decay,
                                                      warmup_ratio=warmup_ratio, total_steps=total, fused=fused,
                                                      rates=rates, eps=eps)
        self.total_steps = total

    def optimizer_step(self) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def steps(self, micro: Iterable[Any], batches: Iterable[Any], step: Callable[[Any, float], Mapping[str, Any]],
              sums: LossSums, ddp: nn.Module | None = None) -> Iterator[Any]:
        """Run ``step(batch, scale)`` (forward and backward) on each micro-batch of this process
        (``micro``: distributed.plan), add its losses to ``sums``, and take an optimizer step after
        the last micro-batch of each step, yielding that micro-batch (the caller logs, saves, stops)."""
        for mb, batch in zip(micro, batches):
            with self.dist.sync(ddp, mb.last):
                losses = step(batch, mb.scale)
            if mb.scale:  # a stand-in (scale 0) is not a sample
                sums.add(losses)
            if mb.last:
                self.optimizer_step()
                yield mb

    # -- checkpoints

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this loop: model, optimizer, scheduler, step, random state."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.global_step, "rng": rng_state()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = state["step"]
        set_rng_state(state["rng"])


__all__ = ["LossSums", "TrainLoop", "atomic_save", "cpu_state", "load_checkpoint_file", "rng_state", "set_rng_state"]
