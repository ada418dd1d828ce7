"""Label smoothness loss, teacher score storage and the smoothing: block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.smoothing import (SmoothingConfig, TeacherScores, label_smoothness_loss,
                                           teacher_probs_from_logits)


def test_beta_zero_is_cross_entropy():
    logits, target = torch.randn(4, 7), torch.tensor([0, 3, 6, 2])
    teacher = torch.softmax(torch.randn(4, 7), -1)
    out = label_smoothness_loss(logits, target, teacher, beta=0.0)
    assert torch.allclose(out.total, F.cross_entropy(logits, target))
    assert torch.allclose(label_smoothness_loss(logits, target, None).total, F.cross_entropy(logits, target))


def test_kl_is_zero_when_the_teacher_is_the_student_and_positive_otherwise():
    logits, target = torch.randn(4, 7), torch.tensor([0, 3, 6, 2])
    same = label_smoothness_loss(logits, target, torch.softmax(logits, -1), beta=0.4)
    assert same.kl.abs() < 1e-6 and torch.allclose(same.total, same.ce)
    teacher = torch.softmax(torch.randn(4, 7), -1)
    other = label_smoothness_loss(logits, target, teacher, beta=0.4)
    expected = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean")
    assert other.kl > 0 and torch.allclose(other.kl, expected, atol=1e-6)
    assert torch.allclose(other.total, other.ce + 0.4 * other.kl)
    # a teacher with zeros (top-k storage) gives a finite KL: 0 log 0 = 0
    sparse = torch.zeros(4, 7)
    sparse[:, 1] = 1.0
    kl = label_smoothness_loss(logits, target, sparse).kl
    # one-hot at item 1: KL = -log p_student(1), averaged over the batch
    assert torch.isfinite(kl) and torch.allclose(kl, -F.log_softmax(logits, -1)[:, 1].mean(), atol=1e-6)


def test_gradient_pulls_the_student_toward_the_teacher():
    logits = torch.randn(3, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2])
    teacher = torch.softmax(torch.randn(3, 5) * 2, -1)
    kl = label_smoothness_loss(logits, target, teacher, beta=1.0).kl
    kl.backward()
    # d KL / d logits = (p_student - p_teacher) / B: descending moves the student toward the teacher
    expected = (torch.softmax(logits, -1) - teacher) / 3
    assert torch.allclose(logits.grad, expected.detach(), atol=1e-6)
    before = (torch.softmax(logits, -1) - teacher).abs().sum()
    stepped = logits.detach() - 1.0 * logits.grad
    after = (torch.softmax(stepped, -1) - teacher).abs().sum()
    assert after < before


def test_teacher_scores_lookup_by_sample_index(tmp_path):
    logits = torch.randn(10, 6)
    # collected out of order, in batches, as a shuffled dataloader would give them
    order = torch.tensor([3, 9, 0, 1, 8, 2, 7, 4, 6, 5])
    batches = [(order[i:i + 4], logits[order[i:i + 4]]) for i in range(0, 10, 4)]
    dense = TeacherScores.collect(batches, 10, kind="real", temperature=2.0, dtype=torch.float32)
    idx = torch.tensor([5, 0, 5])
    assert torch.allclose(dense.lookup(idx), teacher_probs_from_logits(logits[idx], 2.0), atol=1e-6)
    half = TeacherScores.from_logits(logits)  # float16 storage
    assert torch.allclose(half.lookup(idx), torch.softmax(logits[idx], -1), atol=1e-3)
    top = TeacherScores.from_logits(logits, top_k=2)
    rows = top.lookup(idx)
    assert ((rows > 0).sum(-1) == 2).all() and torch.allclose(rows.sum(-1), torch.ones(3))
    assert (rows.argmax(-1) == logits[idx].argmax(-1)).all()
    loaded = TeacherScores.load(top.save(tmp_path / "teacher"), expect_kind="simulated")
    assert torch.equal(loaded.lookup(idx), rows)
    with pytest.raises(UserError, match="trained on 'real' data but the config says smoothing.teacher: simulated"):
        TeacherScores.load(dense.save(tmp_path / "real"), expect_kind="simulated")


def test_teacher_scores_refuse_missing_samples():
    scores = TeacherScores.collect([(torch.tensor([0, 2]), torch.randn(2, 4))], 4)
    with pytest.raises(KeyError, match=r"samples \[1\]"):
        scores.lookup(torch.tensor([0, 1]))
    with pytest.raises(IndexError):
        scores.lookup(torch.tensor([4]))


def test_config_block():
    assert SmoothingConfig.from_dict({}) == SmoothingConfig(beta=0.4, teacher="simulated", temperature=1.0)
    assert not SmoothingConfig.from_dict({"teacher": "none"}).enabled
    assert SmoothingConfig.from_dict({"beta": 1, "teacher": "real"}).beta == 1.0
    with pytest.raises(UserError, match="unknown key 'alpha'; known keys: beta, teacher, temperature, top_k"):
        SmoothingConfig.from_dict({"alpha": 0.1})
    with pytest.raises(UserError, match="key 'teacher' must be one of simulated, real, none"):
        SmoothingConfig.from_dict({"teacher": "kgsf"})
    with pytest.raises(UserError, match="key 'temperature' must be a number > 0"):
        SmoothingConfig.from_dict({"temperature": 0})
