"""Multi-process training (one process per GPU, or several CPU processes) with torch.distributed DDP.

Launch with torchrun (``torchrun --nproc_per_node 2 -m lotcrs_plugin.cli run --config X``, or
``crslab run --nproc 2 --config X``, which starts torchrun; multi-node: torchrun's ``--nnodes`` /
``--rdzv-endpoint``, with ``<root>`` on a shared file system). torchrun's environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT) is what turns it on; without it, or with WORLD_SIZE 1,
:func:`current` is a single-process context whose every method is a no-op, so a one-process run
is unchanged.

Semantics, the same for pre-training and fine-tuning (LOTCRSPretrainSystem, LOTCRSSystem):

- global batch = ``batch_size x grad_accumulation`` whatever the number of processes N, with the
  same learning rate and schedule: the micro-batches of an epoch are the one-process ones (the
  order is a function of seed and epoch), and those of one optimizer step are dealt out to the
  processes (:func:`plan`: micro-batch j of a step goes to process j mod N); DDP averages the
  gradients, and each process scales its losses by N, so the step is the one-process step up to
  floating-point summation order. A micro-batch is never split, so CCA keeps its in-batch
  negatives. ``grad_accumulation`` must be at least N (a multiple of N keeps every process busy);
  a process with no micro-batch in a step (a short last step of an epoch) runs a stand-in with
  weight 0, as DDP needs every process in every gradient exchange;
- process 0 alone validates, tests, writes checkpoints, exports, logs, tensorboard and result
  files; the others wait at a barrier and receive the validation score (:meth:`Dist.broadcast`),
  so the best epoch and early stopping are the same everywhere;
- what is built once from data (the dataset, the simulated dialogs, the memory store, the
  teacher's cached distributions) is built and saved by process 0 and loaded by the others after
  a barrier; resume reads the checkpoint in every process.

Config block ``distributed:`` (:class:`DistributedConfig`); ``crslab run --dist-backend`` overrides
the backend. On CUDA, ``--gpu`` lists the node's GPUs and process LOCAL_RANK uses the
LOCAL_RANK-th of them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence

import torch
from loguru import logger
from torch import nn

from lotcrs_plugin.config_block import typed_values
from lotcrs_plugin.errors import UserError

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistributedConfig:
    """The ``distributed:`` block (read only when torchrun starts several processes).

    backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl. timeout_minutes: how long a process
    waits for the others (process 0 alone validates, tests and trains the teacher meanwhile).
    find_unused_parameters: DDP's option; true because which parts get gradients depends on the
    config (a CCA-only pre-training leaves the masked-LM head out); false is a little faster when
    every trainable parameter is used in every step.
    """

    backend: str = "auto"
    timeout_minutes: int = 120
    find_unused_parameters: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DistributedConfig":
        """Validate a block; UserError names an unknown key, a wrong type or a bad value."""
        d = typed_values(cls, d)
        cfg = cls(**d)
        if cfg.backend not in BACKENDS:
            raise UserError(f"key 'backend' must be {', '.join(BACKENDS)}, not {cfg.backend!r}")
        if cfg.timeout_minutes < 1:
            raise UserError(f"key 'timeout_minutes' must be at least 1, not {cfg.timeout_minutes!r}")
        return cfg


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of this process. index: its position in the epoch (as one process counts);
    end: the epoch position after its optimizer step's last micro-batch; last: this process's
    last micro-batch of the step (gradients are exchanged after it, then the step is taken);
    scale: the factor of its loss (N, 0 for a stand-in; 1 in one process)."""

    index: int
    end: int
    last: bool
    scale: float


def plan(n_batches: int, start: int, accumulation: int, rank: int = 0, world: int = 1) -> list[MicroBatch]:
    """This process's micro-batches of an epoch of ``n_batches``, from position ``start`` on.

    Step k holds positions [k*accumulation, (k+1)*accumulation) (the last one may be short);
    position j of it goes to process (j - k*accumulation) mod world. One process gets every
    position, in order, with scale 1.
    """
    out: list[MicroBatch] = []
    first_step = start // accumulation
    for step_start in range(first_step * accumulation, n_batches, accumulation):
        end = min(step_start + accumulation, n_batches)
        members = range(max(step_start, start), end)
        if not members:
            continue
        mine = [j for j in members if (j - step_start) % world == rank]
        scale = float(world)
        if not mine:  # DDP needs every process in the exchange: a stand-in that adds nothing
            mine, scale = [members[0]], 0.0
        out.extend(MicroBatch(j, end, j == mine[-1], scale) for j in mine)
    return out


class ShardedBatches:
    """The batches of a batch sampler at the positions of a plan (a batch_sampler itself)."""

    def __init__(self, batches: Any, micro: Sequence[MicroBatch]):
        self.batches = batches
        self.indices = [m.index for m in micro]
        self.start = int(getattr(batches, "start", 0))
        self.epoch = getattr(batches, "epoch", 0)  # LOTCRSPretrainSystem.loader seeds from it

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        wanted = iter(self.indices)
        nxt = next(wanted, None)
        for i, batch in enumerate(self.batches, start=self.start):
            while nxt == i:
                yield batch
                nxt = next(wanted, None)
            if nxt is None:
                return


class Dist:
    """Where this process stands (see the module docstring); one process: every method a no-op."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, backend: str | None = None,
                 device: torch.device | None = None, config: DistributedConfig | None = None,
                 owns_group: bool = False):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.backend, self.device = backend, device
        self.config = config or DistributedConfig()
        self._owns_group = owns_group

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
            else:
                torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value`` (any picklable object) in every process."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_over_processes(self, sums: Mapping[str, float], count: int) -> tuple[dict[str, float], int]:
        """(per-key sums, count) added over the processes (keys a process lacks count as 0)."""
        if not self.active:
            return dict(sums), count
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, ({k: float(v) for k, v in sums.items()}, int(count)))
        total: dict[str, float] = {}
        for part, _ in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total, sum(n for _, n in parts)

    def check_accumulation(self, accumulation: int, key: str) -> None:
        """Every process needs micro-batches: grad_accumulation >= processes (a multiple: balanced)."""
        if not self.active:
            return
        if accumulation < self.world:
            raise UserError(f"{key} {accumulation} is below the {self.world} processes: the global batch is "
                            f"batch_size x grad_accumulation, dealt out to the processes; set {key} to a "
                            f"multiple of {self.world} (and batch_size to the micro-batch of one process)")
        if accumulation % self.world:
            logger.warning(f"[distributed] {key} {accumulation} is not a multiple of {self.world} processes: "
                           f"some do more micro-batches per step than others")

    def plan(self, n_batches: int, start: int, accumulation: int) -> list[MicroBatch]:
        return plan(n_batches, start, accumulation, self.rank, self.world)

    def shard(self, batches: Any, micro: Sequence[MicroBatch]) -> Any:
        """A batch sampler yielding this process's micro-batches (``batches`` itself in one process)."""
        return ShardedBatches(batches, micro) if self.active else batches

    def wrap(self, module: nn.Module) -> nn.Module | None:
        """``module`` in DistributedDataParallel (None in one process). The caller keeps using
        ``module`` for everything but the training forward (state dicts keep their names)."""
        if not self.active:
            return None
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # broadcast_buffers off: the model's buffers are constants (the evidence term's sparse KG
        # tables, which DDP cannot broadcast), identical in every process from construction
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                       find_unused_parameters=self.config.find_unused_parameters)

    @staticmethod
    def sync(ddp: nn.Module | None, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP exchanges gradients only after the
        last micro-batch of a step (no_sync before)."""
        if ddp is None or last:
            return contextlib.nullcontext()
        return ddp.no_sync()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block first (it writes the caches), the others after it (they read)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self._owns_group = False
        global _CURRENT
        if _CURRENT is self:
            _CURRENT = None


_CURRENT: Dist | None = None


def launched() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) without it."""
    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value else default
        except ValueError:
            raise UserError(f"environment variable {name} must be an integer, not {value!r}") from None

    return number("WORLD_SIZE", 1), number("RANK", 0), number("LOCAL_RANK", 0)


def current() -> Dist:
    """This process's context (a one-process one unless :func:`setup` started a group)."""
    return _CURRENT if _CURRENT is not None else Dist()


def setup(block: Mapping[str, Any] | None, crs_opt: dict, backend: str | None = None) -> Dist:
    """Join the process group torchrun describes and pick this process's device: on CUDA the
    LOCAL_RANK-th GPU of ``crs_opt['gpu']`` (which is then narrowed to it). One process: a no-op
    context. ``backend``: the command line's, over the block's."""
    global _CURRENT
    cfg = DistributedConfig.from_dict(block)
    if backend:
        cfg = DistributedConfig.from_dict({**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "backend": backend})
    world, rank, local_rank = launched()
    if world <= 1:
        return Dist(config=cfg)
    gpus = list(crs_opt.get("gpu", [-1]))
    cuda = gpus != [-1]
    name = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if name == "nccl" and not cuda:
        raise UserError("distributed backend nccl needs GPUs: pass --gpu with the node's GPUs (e.g. --gpu 0,1), "
                        "or use backend gloo on CPU")
    device = torch.device("cpu")
    if cuda:
        if local_rank >= len(gpus):
            raise UserError(f"--gpu lists {len(gpus)} GPU(s) but this node runs process LOCAL_RANK {local_rank}; "
                            f"list one GPU per process (e.g. --gpu {','.join(map(str, range(local_rank + 1)))})")
        device = torch.device("cuda", gpus[local_rank])
        torch.cuda.set_device(device)
        crs_opt["gpu"] = [gpus[local_rank]]
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group(name, timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
                                             world_size=world, rank=rank)
    _CURRENT = Dist(world, rank, local_rank, name, device, cfg, owns_group=owns)
    logger.info(f"[distributed] process {rank} of {world} (local {local_rank}), backend {name}, device {device}")
    return _CURRENT


__all__ = ["BACKENDS", "Dist", "DistributedConfig", "MicroBatch", "ShardedBatches", "current", "launched", "plan",
           "setup"]
