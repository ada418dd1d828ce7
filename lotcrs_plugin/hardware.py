"""What the machine's processor runs fast: read once from the CPU's flags, logged with every run.

bf16 autocast pays on a CPU only where the ISA has bf16 arithmetic (AVX512_BF16 dot products or AMX
tiles); elsewhere PyTorch emulates it and autocast is slower than fp32. The systems ask
:func:`bf16_autocast_pays` for their device instead of assuming a machine.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class CpuInfo:
    """model: the processor's name; flags: the ISA extensions of :data:`_FLAGS_SHOWN` it has."""

    model: str
    flags: tuple[str, ...]

    @property
    def bf16_fast(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def describe(self) -> str:
        return f"{self.model} ({', '.join(self.flags) or 'no AVX-512 / AMX'})"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The processor's model name and ISA flags (Linux /proc/cpuinfo; elsewhere the platform's name)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuInfo(model, tuple(f for f in _FLAGS_SHOWN if f in flags))


def bf16_autocast_pays(device: torch.device | str) -> bool:
    """bf16 autocast is worth turning on: a CUDA device, or a CPU whose ISA has bf16 arithmetic."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and cpu_info().bf16_fast


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice: the physical cores or OMP_NUM_THREADS


FREE_CORES = -1  # ``threads: -1``: the cores the load average leaves free


def training_threads(requested: int = 0, *, load: float | None = None, cores: int | None = None) -> int:
    """Torch intra-op threads for training. ``requested`` > 0: that many. 0: torch's default (the
    machine's physical cores, or OMP_NUM_THREADS when set), whatever the load, because the thread count
    changes how reductions round, so a run's metrics would depend on what else ran at its start.
    -1 (FREE_CORES): torch's default cut to the cores that are free, faster on a busy machine (an
    OpenMP thread on a core that another process holds makes the others wait at every parallel
    region: on the shared 2-core machine, 2 threads trained MiniLM at 0.25x the speed of 1 while the
    load average was 10, benchmarks/results/speed_cpu.md) but not reproducible across loads. The free
    cores are the cores minus the 1-minute load average, plus this process's own share of it."""
    if requested > 0:
        return requested
    base = max(1, _TORCH_DEFAULT_THREADS)
    if requested != FREE_CORES or "OMP_NUM_THREADS" in os.environ:  # the default, or the user's choice
        return base
    cores = cores or os.cpu_count() or base
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform
            return base
    free = int(round(cores - load + 1.0))
    return max(1, min(base, free))


__all__ = ["FREE_CORES", "CpuInfo", "bf16_autocast_pays", "cpu_info", "training_threads"]
