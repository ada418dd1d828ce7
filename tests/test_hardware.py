"""The machine's processor and the training thread count chosen from it."""

from __future__ import annotations

import pytest

from lotcrs_plugin import hardware
from lotcrs_plugin.config_blocks.finetune import FinetuneConfig
from lotcrs_plugin.config_blocks.pretrain import PretrainConfig
from lotcrs_plugin.errors import UserError


def test_training_threads_follow_the_default_and_only_minus_one_reads_the_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 8)
    assert hardware.training_threads(3, load=50.0) == 3  # asked for: given
    # 0: torch's default at any load, so the same config and seed round the same way
    assert hardware.training_threads(0, load=10.0, cores=2) == 8
    assert hardware.training_threads(0, load=0.0, cores=8) == 8
    free = hardware.FREE_CORES
    assert hardware.training_threads(free, load=1.0, cores=8) == 8  # idle but for this process
    assert hardware.training_threads(free, load=5.2, cores=8) == 4
    assert hardware.training_threads(free, load=10.0, cores=2) == 1  # the shared machine at load 10
    assert hardware.training_threads(free, load=0.0, cores=16) == 8  # never more than torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(hardware, "_TORCH_DEFAULT_THREADS", 2)
    assert hardware.training_threads(free, load=30.0, cores=2) == 2  # the user's OMP_NUM_THREADS stands


@pytest.mark.parametrize("block", [FinetuneConfig, PretrainConfig])
def test_threads_below_minus_one_are_refused(block):
    assert block.from_dict({"threads": hardware.FREE_CORES}).threads == -1
    with pytest.raises(UserError, match="threads"):
        block.from_dict({"threads": -2})


def test_cpu_info_names_the_model_and_flags():
    info = hardware.cpu_info()
    assert info.model and info.describe().startswith(info.model)
    assert set(info.flags) <= set(hardware._FLAGS_SHOWN)
    assert info.bf16_fast == ("avx512_bf16" in info.flags or "amx_bf16" in info.flags)
    assert hardware.bf16_autocast_pays("cpu") == info.bf16_fast and hardware.bf16_autocast_pays("cuda")
