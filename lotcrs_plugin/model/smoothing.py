"""Label smoothness (LOT-CRS step 3): a teacher's item distribution softens the targets.

    L = CE(student_logits, item) + beta * KL(teacher_probs || student_probs)

The teacher is a recommender trained beforehand: on the simulated data (``teacher:
simulated``, as the paper describes it) or on the real training split (``teacher: real``, as
the authors' code does with KGSF). Its item distribution for every training sample is computed
once (:meth:`TeacherScores.collect`), kept (optionally only its top items, in float16) and
looked up by sample index in each batch (:meth:`TeacherScores.lookup`). Both distributions
are over the same item list (the catalog positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F

from lotcrs_plugin.config_block import Check, integer, number, one_of, positive_number, typed_values
from lotcrs_plugin.errors import UserError

TEACHER_KINDS = ("simulated", "real", "none")
MANIFEST = "manifest.json"
FORMAT = "lotcrs-teacher-scores"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SmoothingConfig:
    """The ``smoothing:`` block.

    beta:        weight of KL(teacher || student) (paper and authors' code: 0.4).
    teacher:     simulated (trained on the simulated data, the paper), real (trained on the real
                 training split, the authors' code) or none (plain cross-entropy).
    temperature: the teacher's logits are divided by it before the softmax (> 1 flattens).
    top_k:       keep only each sample's top_k teacher items (renormalised) to save memory;
                 null keeps the whole distribution.
    """

    beta: float = 0.4
    teacher: str = "simulated"
    temperature: float = 1.0
    top_k: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SmoothingConfig":
        """Validate a ``smoothing:`` block; UserError names an unknown key or a wrong value."""
        return cls(**typed_values(cls, d, CHECKS))

    @property
    def enabled(self) -> bool:
        """Whether the KL term is on (a teacher and beta > 0)."""
        return self.teacher != "none" and self.beta > 0


CHECKS: dict[str, Check] = {
    "teacher": one_of(TEACHER_KINDS),
    "beta": number("a number >= 0", lambda v: v >= 0),
    "temperature": positive_number,
    "top_k": integer("an integer > 0 or null", lambda v: v > 0, null=True),
}


class SmoothnessLoss(NamedTuple):
    """The loss and its two parts (for logging); ``total`` is what is backpropagated."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def label_smoothness_loss(student_logits: torch.Tensor, target: torch.Tensor,
                          teacher_probs: torch.Tensor | None = None, beta: float = 0.4) -> SmoothnessLoss:
    """CE(student, target) + beta * KL(teacher || student), both averaged over the batch.

    student_logits [B, C]; target [B] item positions; teacher_probs [B, C] rows summing to 1
    (None or beta 0: cross-entropy only). KL = sum_c p_t (log p_t - log p_s), with 0 log 0 = 0.
    """
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    ce = F.nll_loss(log_student, target.long())
    if teacher_probs is None or beta == 0:
        kl = torch.zeros((), device=student_logits.device)
        return SmoothnessLoss(ce, ce, kl)
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(f"label smoothness: teacher_probs {list(teacher_probs.shape)} and student_logits "
                         f"{list(student_logits.shape)} must have the same shape")
    p = teacher_probs.to(log_student.dtype)
    kl = (torch.xlogy(p, p) - p * log_student).sum(-1).mean()
    return SmoothnessLoss(ce + beta * kl, ce, kl)


def teacher_probs_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)


class TeacherScores:
    """Per-sample teacher item distributions, computed once and looked up by sample index.

    Dense storage keeps [N, C] probabilities; with ``top_k`` only each row's top_k
    probabilities and their item positions [N, top_k] (renormalised to sum 1). Storage is
    float16 by default (probabilities below ~6e-8 become 0); :meth:`lookup` returns float32
    rows renormalised to sum 1.
    """

    def __init__(self, probs: torch.Tensor, indices: torch.Tensor | None, n_items: int,
                 covered: torch.Tensor, kind: str = "simulated", temperature: float = 1.0):
        self.probs = probs          # [N, C] or [N, top_k]
        self.indices = indices      # None (dense) or [N, top_k] int64 item positions
        self.n_items = int(n_items)
        self.covered = covered      # [N] bool: rows that were filled
        self.kind = kind
        self.temperature = float(temperature)

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    @property
    def top_k(self) -> int | None:
        return None if self.indices is None else int(self.indices.shape[1])

    @classmethod
    def collect(cls, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_samples: int, *,
                kind: str = "simulated", temperature: float = 1.0, top_k: int | None = None,
                dtype: torch.dtype = torch.float16) -> "TeacherScores":
        """From (sample indices [B], teacher item logits [B, C]) pairs, e.g. a teacher model run
        over the training dataloader under torch.no_grad(); every index in [0, n_samples) that
        will be looked up must appear."""
        if kind not in TEACHER_KINDS[:2]:
            raise UserError(f"teacher kind must be simulated or real, not {kind!r}")
        store: TeacherScores | None = None
        for idx, logits in batches:
            idx = idx.detach().long().cpu()
            probs = teacher_probs_from_logits(logits.detach(), temperature).cpu()
            if store is None:
                c = probs.shape[1]
                width = c if top_k is None else min(top_k, c)
                store = cls(torch.zeros(n_samples, width, dtype=dtype),
                            None if top_k is None else torch.zeros(n_samples, width, dtype=torch.long),
                            c, torch.zeros(n_samples, dtype=torch.bool), kind, temperature)
            store._put(idx, probs)
        if store is None:
            raise UserError("teacher scores: the teacher produced no batches; check its dataloader")
        return store

    @classmethod
    def from_logits(cls, logits: torch.Tensor, **kwargs: Any) -> "TeacherScores":
        """From the logits [N, C] of all samples at once (sample i is row i)."""
        return cls.collect([(torch.arange(logits.shape[0]), logits)], logits.shape[0], **kwargs)

    def _put(self, idx: torch.Tensor, probs: torch.Tensor) -> None:
        if probs.shape[1] != self.n_items:
            raise ValueError(f"teacher scores: a batch has {probs.shape[1]} items, the first had {self.n_items}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"teacher scores: sample index out of [0, {len(self)})")
        if self.indices is None:
            self.probs[idx] = probs.to(self.probs.dtype)
        else:
            top, where = probs.topk(self.indices.shape[1], dim=-1)
            self.probs[idx] = (top / top.sum(-1, keepdim=True)).to(self.probs.dtype)
            self.indices[idx] = where
        self.covered[idx] = True

    def lookup(self, sample_idx: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Teacher distributions [B, C] (float32, rows sum to 1) of the samples ``sample_idx`` [B]."""
        device = sample_idx.device if device is None else torch.device(device)
        idx = sample_idx.detach().long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"teacher scores: sample index out of [0, {len(self)})")
        if not bool(self.covered[idx].all()):
            missing = idx[~self.covered[idx]][:5].tolist()
            raise KeyError(f"teacher scores: no teacher distribution for samples {missing}; "
                           f"the teacher pass must cover every training sample")
        rows = self.probs[idx].to(device=device, dtype=torch.float32)
        if self.indices is not None:
            dense = torch.zeros(idx.shape[0], self.n_items, device=device)
            rows = dense.scatter_(1, self.indices[idx].to(device), rows)
        return rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)

    # ---- files ----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write probs.pt (+ indices.pt, covered.pt) and manifest.json (last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        torch.save(self.probs, folder / "probs.pt")
        torch.save(self.covered, folder / "covered.pt")
        if self.indices is not None:
            torch.save(self.indices, folder / "indices.pt")
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                    "temperature": self.temperature, "n_samples": len(self), "n_items": self.n_items,
                    "top_k": self.top_k, "dtype": str(self.probs.dtype)}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path, expect_kind: str | None = None) -> "TeacherScores":
        """Scores written by :meth:`save`; ``expect_kind`` (the config's teacher) must match."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(f"teacher scores: {path} not found; give a folder written by TeacherScores.save")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise UserError(f"{path}: not teacher scores of format {FORMAT} version {FORMAT_VERSION}")
        if expect_kind is not None and manifest["kind"] != expect_kind:
            raise UserError(f"{path}: teacher trained on '{manifest['kind']}' data but the config says "
                            f"smoothing.teacher: {expect_kind}; recompute the scores or change the config")
        probs = torch.load(folder / "probs.pt", weights_only=True)
        covered = torch.load(folder / "covered.pt", weights_only=True)
        indices = torch.load(folder / "indices.pt", weights_only=True) if manifest["top_k"] is not None else None
        if probs.shape[0] != manifest["n_samples"] or covered.shape != (manifest["n_samples"],):
            raise UserError(f"{path}: the tensors do not match the manifest's {manifest['n_samples']} samples")
        return cls(probs, indices, manifest["n_items"], covered, manifest["kind"], manifest["temperature"])
