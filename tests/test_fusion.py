"""Retrieval fusion and the retrieval contrastive loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lotcrs_plugin.config_blocks.retrieval import RetrievalConfig
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.fusion import RetrievalFusion, retrieval_contrastive_loss
from lotcrs_plugin.model.retrieval import MemoryStore

H = 8


def test_weight_zero_is_layer_norm_of_h():
    torch.manual_seed(0)
    fusion = RetrievalFusion(H, weight=0.0, dropout=0.1).eval()
    h, v = torch.randn(2, 5, H), torch.randn(2, 3, H)
    expected = F.layer_norm(h, (H,), fusion.layer_norm.weight, fusion.layer_norm.bias, fusion.layer_norm.eps)
    assert torch.allclose(fusion(h, v), expected, atol=1e-6)


def test_planted_values_come_out_of_the_attention():
    torch.manual_seed(1)
    fusion = RetrievalFusion(H).eval()
    h = torch.randn(2, 4, H)
    planted = torch.randn(2, 1, H)
    values = planted.expand(2, 3, H).clone()
    out, weights = fusion.attend(h, values)
    assert torch.allclose(out, planted.expand(2, 4, H), atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4))
    # masked slots are ignored, whatever they hold
    values[:, 2] = 100.0
    out, _ = fusion.attend(h, values, value_mask=torch.tensor([[1, 1, 0], [1, 1, 0]]))
    assert torch.allclose(out, planted.expand(2, 4, H), atol=1e-6)
    # no valid slot: zero attention, so LayerNorm(h), and no NaN
    fused = fusion(h, values, value_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.allclose(fused, fusion.layer_norm(h), atol=1e-6)


def test_token_mask_leaves_padding_alone():
    fusion = RetrievalFusion(H).eval()
    h, v = torch.randn(1, 4, H), torch.randn(1, 2, H)
    fused = fusion(h, v, token_mask=torch.tensor([[1, 1, 0, 0]]))
    assert torch.equal(fused[0, 2:], h[0, 2:]) and not torch.allclose(fused[0, :2], h[0, :2])


def test_fusion_moves_the_item_scores_toward_the_retrieved_item():
    """A verbaliser reads the [MASK] state; retrieving values of item 3 makes item 3 the top score."""
    torch.manual_seed(2)
    verbaliser = torch.eye(H)[:6] * 3  # 6 items, one direction each
    h = torch.randn(1, 5, H) * 0.3
    h[0, 4] = verbaliser[0] / 3 + 0.1 * torch.randn(H)  # the [MASK] state leans to item 0
    values = verbaliser[3].expand(1, 4, H)
    before = RetrievalFusion(H, weight=0.0).eval()(h, values)[0, 4] @ verbaliser.T
    after = RetrievalFusion(H, weight=1.0).eval()(h, values)[0, 4] @ verbaliser.T
    assert before.argmax().item() == 0 and after.argmax().item() == 3
    assert after[3] - after[0] > before[3] - before[0]


def test_fusion_trains():
    fusion = RetrievalFusion(H)
    h, v = torch.randn(2, 3, H), torch.randn(2, 4, H)
    fusion(h, v).pow(2).sum().backward()
    assert fusion.query.weight.grad.abs().sum() > 0 and fusion.key.weight.grad.abs().sum() > 0


def _store(normalize: bool = True) -> tuple[MemoryStore, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, H)).astype(np.float32)
    items = np.repeat(np.arange(20) + 1, 6)
    keys = centers[items - 1] + rng.normal(scale=0.1, size=(items.size, H)).astype(np.float32)
    store = MemoryStore.build(keys, np.zeros_like(keys), items, RetrievalConfig(normalize=normalize))
    return store, centers


def test_contrastive_loss_matches_a_reference():
    store, _ = _store()
    q = torch.randn(3, H, requires_grad=True)
    target = torch.tensor([2, 5, 99])  # item 99 is not in the store: no positives, no loss
    loss = retrieval_contrastive_loss(q, store, target, n_pos=4, n_neg=16, temperature=0.1,
                                      generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, computed one by one
    pos, ok = store.entries_of_items(target, 4, generator=g)
    neg = torch.randint(len(store), (3, 16), generator=g)
    keys, items, qn = torch.from_numpy(store.keys), torch.from_numpy(store.items), F.normalize(q, dim=-1)
    terms = []
    for b in range(2):
        negs = [keys[j] @ qn[b] / 0.1 for j in neg[b] if items[j] != target[b]]
        per = [torch.logsumexp(torch.stack([keys[p] @ qn[b] / 0.1, *negs]), 0) - keys[p] @ qn[b] / 0.1
               for p, o in zip(pos[b], ok[b]) if o]
        assert len(per) == 4
        terms.append(torch.stack(per).mean())
    assert not ok[2].any()
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    loss.backward()
    assert q.grad.abs().sum() > 0


def test_contrastive_loss_pulls_queries_to_their_item():
    store, centers = _store()
    target = torch.tensor([1, 7, 12])
    right = torch.from_numpy(centers[target.numpy() - 1])
    wrong = torch.from_numpy(centers[[3, 3, 3]])
    kw = dict(n_pos=4, n_neg=64, temperature=0.05)
    good = retrieval_contrastive_loss(right, store, target, generator=torch.Generator().manual_seed(0), **kw)
    bad = retrieval_contrastive_loss(wrong, store, target, generator=torch.Generator().manual_seed(0), **kw)
    assert good < 0.5 < bad
    q = wrong.clone().requires_grad_(True)
    optim = torch.optim.SGD([q], lr=0.5)
    for step in range(30):
        optim.zero_grad()
        retrieval_contrastive_loss(q, store, target, generator=torch.Generator().manual_seed(step), **kw).backward()
        optim.step()
    found = store.search(q.detach(), k=1).items[:, 0]
    assert found.tolist() == target.tolist()


def test_contrastive_loss_without_positives_is_zero_with_a_graph():
    store, _ = _store(normalize=False)
    q = torch.randn(2, H, requires_grad=True)
    loss = retrieval_contrastive_loss(q, store, torch.tensor([50, 60]))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(UserError, match=r"queries must be \[B, 8\]"):
        retrieval_contrastive_loss(torch.randn(2, H + 1), store, torch.tensor([1, 2]))
