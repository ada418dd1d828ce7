"""The machine's processor and the training thread count chosen from it."""

from __future__ import annotations

from lotcrs_plugin import hardware


def test_training_threads_are_the_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 8)
    assert hardware.training_threads(3, load=50.0) == 3  # asked for: given
    assert hardware.training_threads(0, load=1.0, cores=8) == 8  # idle but for this process: torch's default
    assert hardware.training_threads(0, load=5.2, cores=8) == 4
    assert hardware.training_threads(0, load=10.0, cores=2) == 1  # the shared machine at load 10
    assert hardware.training_threads(0, load=0.0, cores=16) == 8  # never more than torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 2)
    assert hardware.training_threads(0, load=30.0, cores=2) == 2  # the user's OMP_NUM_THREADS stands


def test_cpu_info_names_the_model_and_flags():
    info = hardware.cpu_info()
    assert info.model and info.describe().startswith(info.model)
    assert set(info.flags) <= set(hardware._FLAGS_SHOWN)
    assert info.bf16_fast == ("avx512_bf16" in info.flags or "amx_bf16" in info.flags)
    assert hardware.bf16_autocast_pays("cpu") == info.bf16_fast and hardware.bf16_autocast_pays("cuda")
