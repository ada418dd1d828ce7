"""benchmarks/speed.py on the tiniest settings: every part measured with a positive number, the
ratio is the quotient of the two reported throughputs, both sides timed on the same sequences,
the files written where asked; without faiss, or without crslab, the parts that need them are
skipped with a reason and the rest still runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TINY = ["--arch", "tiny", "--items", "50", "--conversations", "60", "--per-item", "2", "--batch", "4",
        "--seq", "32", "--steps", "2", "--warmup", "1", "--eval-batch", "16", "--queries", "64", "--threads", "1",
        "--retrieval", "on"]
MEASURED = {
    "simulator": ("conversations", "seconds", "conversations_s"),
    "pretrain": ("samples_s", "tokens_s", "examples_s", "step_s", "flops", "mfu", "sample_build_s"),
    "crslab_bert": ("samples_s", "tokens_s", "step_s", "flops", "mfu"),
    "store": ("entries", "seconds", "entries_s"),
    "retrieval": ("queries", "seconds", "queries_s"),
    "finetune": ("samples_s", "tokens_s", "step_s", "flops", "mfu"),
    "hf_reference": ("samples_s", "tokens_s", "step_s", "flops", "mfu"),
    "evaluation": ("samples", "items", "seconds", "samples_s"),
    "memory": ("peak_rss_mb",),
    "ratio": ("samples", "tokens"),
}


def load_speed():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # speed.py imports _common from its folder
    spec = importlib.util.spec_from_file_location("speed_bench", BENCH / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_every_part_is_measured_and_the_ratio_is_the_quotient(tmp_path):
    speed = load_speed()
    out = tmp_path / "res" / "speed.md"
    returned = speed.main([*TINY, "--peak", "1e12", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"] == json.loads(json.dumps(returned["results"]))
    r = saved["results"]
    assert saved["skipped"] == {}
    for part, keys in MEASURED.items():
        for key in keys:
            assert positive(r[part][key]), (part, key, r[part].get(key))
    assert r["ratio"]["samples"] == pytest.approx(r["pretrain"]["samples_s"] / r["crslab_bert"]["samples_s"], rel=1e-12)
    assert r["ratio"]["tokens"] == pytest.approx(r["pretrain"]["tokens_s"] / r["crslab_bert"]["tokens_s"], rel=1e-12)
    # both sides timed on the same sequences; a CCA pair is two samples and one example
    assert r["crslab_bert"]["samples"] == r["pretrain"]["samples"] == 2 * 3 * 4
    assert r["crslab_bert"]["tokens"] == r["pretrain"]["tokens"]
    assert r["pretrain"]["examples"] == 2 * 2 * 4
    assert r["pretrain"]["rounds"] == r["crslab_bert"]["rounds"] == 2  # alternating every step on CPU
    # the plain loop on the very rows of the fine-tuning batches; ratios to it
    assert r["hf_reference"]["samples"] == r["finetune"]["samples"] == 2 * 4
    assert r["hf_reference"]["tokens"] == r["finetune"]["tokens"]
    assert r["hf_reference"]["rounds"] == r["finetune"]["rounds"] == 2
    for part in ("pretrain", "crslab_bert", "finetune"):
        assert r["vs_reference"][part]["samples"] == pytest.approx(
            r[part]["samples_s"] / r["hf_reference"]["samples_s"], rel=1e-12)
    assert saved["device"]["cpu"].startswith(saved["device"]["name"]) and "isa_flags" in saved["device"]
    for part in ("pretrain", "crslab_bert", "finetune", "hf_reference"):  # MFU against the given peak
        x = r[part]
        assert x["mfu"] == pytest.approx(x["flops"] / x["seconds"] / 1e12, rel=1e-12)
        assert x["samples_s"] == pytest.approx(x["samples"] / x["seconds"], rel=1e-12)
    assert r["finetune"]["retrieval"] is True and r["evaluation"]["retrieval"] is True
    assert r["evaluation"]["items"] == 50
    assert saved["device"]["kind"] == "cpu" and "python benchmarks/speed.py --arch tiny" in saved["command"]
    text = out.read_text()
    assert f"| ratio pre-training / CRSLab BERT | {r['ratio']['samples']:.2f}x samples/s |" in text
    assert f"| ratio fine-tuning / plain HF loop | {r['vs_reference']['finetune']['samples']:.2f}x samples/s |" in text
    assert saved["device"]["cpu"] in text  # the CPU's model and ISA flags with the figures
    assert sorted(p.name for p in out.parent.iterdir()) == ["speed.json", "speed.md"]


def test_without_faiss_the_store_parts_are_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` fails as on a machine without it
    speed = load_speed()
    out = tmp_path / "speed.md"
    rep = speed.main([*TINY, "--out", str(out)])
    r = rep["results"]
    assert set(rep["skipped"]) == {"store", "retrieval"}
    assert all("needs faiss" in why for why in rep["skipped"].values())
    err = capsys.readouterr().err
    assert "speed.py: skipping store: needs faiss" in err and "speed.py: skipping retrieval: needs faiss" in err
    assert positive(r["finetune"]["samples_s"]) and r["finetune"]["retrieval"] is False
    assert positive(r["ratio"]["samples"]) and positive(r["evaluation"]["seconds"])
    assert r["pretrain"]["mfu"] is None  # no peak on CPU unless given
    assert "Skipped store: needs faiss" in out.read_text()


def test_without_crslab_only_the_simulator_runs(tmp_path):
    """A fresh process where crslab cannot be imported (as on the GPU machine without it)."""
    out = tmp_path / "speed.md"
    code = ("import runpy, sys; sys.modules['crslab'] = None; "
            f"sys.argv = ['speed.py', *{TINY!r}, '--out', {str(out)!r}]; "
            f"runpy.run_path({str(BENCH / 'speed.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert positive(rep["results"]["simulator"]["conversations_s"])
    assert set(rep["skipped"]) == {"pretrain", "crslab_bert", "store", "retrieval", "finetune", "hf_reference",
                                   "evaluation"}
    skips = [line for line in proc.stderr.splitlines() if line.startswith("speed.py: skipping")]
    assert len(skips) == 7 and all("needs crslab" in line for line in skips)


def test_flops_peaks_and_device_names():
    speed = load_speed()
    import _common

    assert _common.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert _common.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert _common.peak_bf16_flops("NVIDIA H200") == 989e12
    assert _common.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert _common.peak_bf16_flops("Some Other GPU") is None
    assert speed.device_kind("NVIDIA H100 80GB HBM3", "cuda") == "h100"
    assert speed.device_kind("NVIDIA H200", "cuda") == "h200"
    assert speed.device_kind("AMD EPYC", "cpu") == "cpu"
    # a layer: Q, K, V, O (H x H + bias), a norm, the FFN in and out (with biases), a norm
    from transformers import BertConfig, BertModel

    dims = _common.encoder_dims(BertModel(BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                                     intermediate_size=128, vocab_size=100)))
    per_layer = 4 * (64 * 64 + 64) + 2 * 64 + (64 * 128 + 128) + (128 * 64 + 64) + 2 * 64
    assert dims == {"layers": 2, "hidden": 64, "dense_params": 2 * per_layer}
    flops = _common.encoder_train_flops(dims, 3, 10, head_rows=100, head_positions=5, extra_dense_per_sequence=7)
    assert flops == (6 * 2 * per_layer + 12 * 2 * 64 * 10) * 30 + 6 * 64 * 100 * 5 + 6 * 7 * 3
    assert _common.mfu(2e12, 2.0, 1e12) == 1.0 and _common.mfu(1.0, 1.0, None) is None
