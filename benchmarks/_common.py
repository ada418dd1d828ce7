"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_X.py`, so this
folder is on sys.path)."""

from __future__ import annotations



def cpu_name() -> str:
    """The processor's model name, for the device line of every result."""
    from lotcrs_plugin.hardware import cpu_info

    return cpu_info().model


# ---- FLOPs and MFU (one definition for every benchmark) --------------------------------------

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; matched in order
# against torch.cuda.get_device_name(), so the specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),          # SXM (e.g. "NVIDIA H100 80GB HBM3")
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("A10G",), 70e12),
    (("A10",), 125e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name; None when the name is not known (give
    the benchmark's --peak then)."""
    upper = device_name.upper()
    for words, peak in PEAK_BF16_FLOPS:
        if all(w in upper for w in words):
            return peak
    return None


def encoder_dims(encoder_model) -> dict:
    """Layers, hidden size and dense (non-embedding) parameters of a Hugging Face BERT-style
    model (anything with ``config`` and an ``encoder`` submodule: BertModel, or the base_model
    of BertForMaskedLM)."""
    base = getattr(encoder_model, "base_model", encoder_model)
    cfg = base.config
    return {"layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size),
            "dense_params": int(sum(p.numel() for p in base.encoder.parameters()))}


def encoder_train_flops(dims: dict, sequences: int, width: int, *, head_rows: int = 0, head_positions: int = 0,
                        extra_dense_per_sequence: int = 0) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) of an encoder on
    ``sequences`` padded rows of ``width`` tokens:

    - 6 N per token for the dense weights of the layers (N = dims['dense_params'], embeddings
      excluded: a lookup is no matrix product);
    - 12 L H T per token for the attention scores and their weighted sum (T = width; PaLM's
      appendix B);
    - 6 H V per scored position of an output head with V rows (an MLM head over the vocabulary,
      a verbaliser over the items, a linear layer over the entities), for ``head_positions``
      positions;
    - 6 x ``extra_dense_per_sequence`` per row (small per-sequence layers: pooler, projection,
      the head's H x H transform).

    Padded positions count: the device computes them.
    """
    tokens = sequences * width
    per_token = 6 * dims["dense_params"] + 12 * dims["layers"] * dims["hidden"] * width
    return float(per_token * tokens + 6 * dims["hidden"] * head_rows * head_positions
                 + 6 * extra_dense_per_sequence * sequences)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None without one)."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / peak
