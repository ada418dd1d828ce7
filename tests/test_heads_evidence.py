"""Item-scoring heads (lotcrs_plugin.model.heads) and the evidence term
(lotcrs_plugin.model.evidence, lotcrs_plugin.data.context_evidence) on tiny hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lotcrs_plugin.data.context_evidence import ITEM_FEATURES, EvidenceBuilder, ItemAttributes
from lotcrs_plugin.data.turns import TurnTable
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones import TokenBatch, build_backbone
from lotcrs_plugin.model.evidence import EvidenceConfig, EvidenceTerm
from lotcrs_plugin.model.heads import HeadConfig, ItemHead, build_head, head_names, register_head
from lotcrs_plugin.registry import RegistryError

WORDS = "hi i like movies you should watch the a great comedy film by hidden echo city secret river anna".split()
NAMES = ["Hidden Echo (1984)", "Secret River (1990)", "Anna", "City Film"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), "(", ")", *"0123456789"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    bb = build_backbone("bert", str(folder))
    bb.add_item_tokens(NAMES, [10, 11, 12, 13])
    return bb.eval()


def _batch(bb) -> TokenBatch:
    rows = []
    for text in ("hi i like <item_0>", "a great comedy film by anna"):
        ids = np.asarray(bb.tokenizer(text, add_special_tokens=False)["input_ids"] + bb.sep_ids, dtype=np.int64)
        rows.append(bb.format_input(ids, prompt=True, max_length=32))
    from lotcrs_plugin.data.pretrain_samples import collate

    return collate(rows, bb.pad_token_id, 1)


def test_registry_lists_the_heads_and_refuses_a_taken_name():
    assert {"verbaliser", "linear", "dot"} <= set(head_names())
    with pytest.raises(RegistryError, match="already taken"):
        @register_head("dot")
        class Other(ItemHead):
            pass
    with pytest.raises(UserError, match="known heads: dot, linear, verbaliser"):
        HeadConfig.from_dict({"type": "mlp"})
    with pytest.raises(UserError, match="unknown key 'kind'"):
        HeadConfig.from_dict({"kind": "dot"})


@pytest.mark.parametrize("name", ["verbaliser", "linear", "dot"])
def test_each_head_scores_as_its_linear_parts(backbone, name):
    head = build_head(backbone, HeadConfig(type=name))
    batch = _batch(backbone)
    with torch.no_grad():
        state = head.read(backbone.encode(batch), batch.attention_mask, batch.mask_positions)
        scores = head(state)
        assert scores.shape == (2, len(NAMES))
        assert torch.allclose(scores, F.linear(*head.linear_parts(state)), atol=1e-5)


def test_verbaliser_is_the_backbones_item_logits_at_the_mask(backbone):
    head = build_head(backbone, HeadConfig(type="verbaliser"))
    batch = _batch(backbone)
    with torch.no_grad():
        hidden = backbone.encode(batch)
        at_mask = hidden[torch.arange(2), batch.mask_positions]
        assert torch.allclose(head(head.read(hidden, batch.attention_mask, batch.mask_positions)),
                              backbone.item_logits(at_mask))
    assert head.own_parameters() == []


def test_dot_head_starts_as_the_mean_state_against_the_item_token_embeddings(backbone):
    head = build_head(backbone, HeadConfig(type="dot", tie=True))  # read: mean
    batch = _batch(backbone)
    with torch.no_grad():
        hidden = backbone.encode(batch)
        m = batch.attention_mask.unsqueeze(-1).float()
        mean = (hidden * m).sum(1) / m.sum(1)
        rows = backbone.model.get_input_embeddings().weight[backbone.first_item_id:]
        assert torch.allclose(head(head.read(hidden, batch.attention_mask, None)), mean @ rows.t(), atol=1e-5)
        # tied: the backbone's item rows ARE the head's item vectors
        rows[2] += 1.0
        assert torch.equal(head.item_embeddings()[2], rows[2])
        rows[2] -= 1.0
    untied = build_head(backbone, HeadConfig(type="dot", tie=False))
    assert any(p is untied.items for p in untied.own_parameters())


def test_linear_head_learns_a_planted_mapping(backbone):
    torch.manual_seed(0)
    head = build_head(backbone, HeadConfig(type="linear"))
    states = torch.randn(8, backbone.hidden_size)
    targets = torch.arange(8) % len(NAMES)
    opt = torch.optim.Adam(head.own_parameters(), lr=0.05)
    for _ in range(100):
        loss = F.cross_entropy(head(states), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool((head(states).argmax(1) == targets).all())


# ---- the evidence term -------------------------------------------------------------------------

def _table() -> TurnTable:
    """Two dialogs. Dialog 0: turn 0 (seeker) names item 1 and entity 50 (an attribute); turn 1
    (recommender) names items 1 and 2; turn 2 (seeker) names entity 51. Dialog 1: one turn."""
    ids = np.arange(10, dtype=np.int32)
    entity = np.zeros(10, np.int32)
    entity[1], entity[5], entity[6] = 50, 51, 11  # entity 11 is item 1's own entity: not an attribute
    return TurnTable(ids=ids, keyword=entity > 0, entity=entity, turn_offsets=np.array([0, 3, 5, 8, 10]),
                     dialog_offsets=np.array([0, 3, 4]), item_offsets=np.array([0, 1, 3, 3, 3]),
                     turn_items=np.array([1, 1, 2], np.int32), stats={})


def test_builder_features_follow_who_named_an_item_and_when():
    builder = EvidenceBuilder(_table(), np.array([False, True, False, False]), item_entity_ids=[10, 11, 12, 13])
    ev = builder.batch(np.array([[0, 3], [0, 1], [3, 3]]))
    assert ev.items[0].tolist() == [1, 2]
    f = dict(zip(ITEM_FEATURES, ev.item_features[0, 0].tolist()))  # item 1: seeker turn 0, recommender turn 1
    assert f == pytest.approx({"by_seeker": 1, "by_recommender": 1, "log_count": np.log(3), "last_turn": 0,
                               "last_3_turns": 1})
    g = dict(zip(ITEM_FEATURES, ev.item_features[0, 1].tolist()))  # item 2: recommender turn 1 only
    assert g["by_seeker"] == 0 and g["by_recommender"] == 1
    assert sorted(ev.entities[0].tolist()) == [50, 51]  # entity 11 is an item, not an attribute
    assert ev.items[1].tolist() == [1, -1] and ev.entities[1].tolist() == [50, 0]  # padded to the batch's widest
    assert ev.items[2].tolist() == [-1, -1] and ev.entities[2].tolist() == [0, 0]  # an empty context
    hidden = builder.batch(np.array([[0, 3]]), hidden_targets=np.array([1]))
    assert hidden.items[0].tolist() == [2]  # a masked target is not evidence for itself


def _reference_rows(builder: EvidenceBuilder, first: int, cut: int, hidden: int | None) -> tuple:
    """One context's evidence by hand: its distinct items with their features, its attributes."""
    t, items = builder.table, {}
    for turn in range(first, cut):
        for item in t.turn_items[t.item_offsets[turn]:t.item_offsets[turn + 1]].tolist():
            if item == hidden:
                continue
            f = items.setdefault(item, [0.0, 0.0, 0, 0.0, 0.0])
            f[1 if builder.recommender[turn] else 0] = 1.0
            f[2] += 1
            f[3] = max(f[3], float(turn == cut - 1))
            f[4] = max(f[4], float(turn >= cut - 3))
    feats = [[a, b, np.log1p(c), d, e] for _, (a, b, c, d, e) in sorted(items.items())]
    ents: dict[int, int] = {}
    for e in t.entity[t.turn_offsets[first]:t.turn_offsets[cut]].tolist():
        if e > 0 and not (e < len(builder.is_item_entity) and builder.is_item_entity[e]):
            ents[e] = ents.get(e, 0) + 1
    return sorted(items), feats, sorted(ents), [ents[e] for e in sorted(ents)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_evidence_equals_the_per_context_reading(seed):
    """The array code over a batch gives every context exactly what reading it alone gives."""
    rng = np.random.default_rng(seed)
    n_turns = 40
    mentions = rng.integers(0, 4, n_turns)
    item_offsets = np.concatenate([[0], np.cumsum(mentions)])
    tokens = rng.integers(1, 6, n_turns)
    turn_offsets = np.concatenate([[0], np.cumsum(tokens)])
    entity = np.where(rng.random(turn_offsets[-1]) < 0.4, rng.integers(1, 30, turn_offsets[-1]), 0).astype(np.int32)
    table = TurnTable(ids=np.zeros(turn_offsets[-1], np.int32), keyword=entity > 0, entity=entity,
                      turn_offsets=turn_offsets, dialog_offsets=np.array([0, n_turns]), item_offsets=item_offsets,
                      turn_items=rng.integers(0, 12, item_offsets[-1]).astype(np.int32), stats={})
    builder = EvidenceBuilder(table, rng.random(n_turns) < 0.5, item_entity_ids=list(range(20, 26)))
    firsts = rng.integers(0, n_turns, 9)
    contexts = np.stack([firsts, firsts + rng.integers(0, 8, 9)], 1).clip(max=n_turns)
    hidden = rng.integers(0, 12, 9)
    for hide in (None, hidden):
        ev = builder.batch(contexts, hidden_targets=hide)
        for b, (first, cut) in enumerate(contexts):
            items, feats, ents, counts = _reference_rows(builder, first, cut, None if hide is None else hide[b])
            got = ev.items[b].tolist()
            assert got[:len(items)] == items and set(got[len(items):]) <= {-1}
            assert ev.item_features[b, :len(items)].numpy() == pytest.approx(np.asarray(feats, np.float32).reshape(-1, 5))
            assert not ev.item_features[b, len(items):].any()
            assert ev.entities[b, :len(ents)].tolist() == ents and not ev.entities[b, len(ents):].any()
            assert ev.entity_counts[b, :len(ents)].tolist() == counts


def _attributes() -> ItemAttributes:
    # items 0..3 = entities 10..13; director 60 of items 0 and 1; genre 50 of items 1, 2, 3
    triples = [[10, "director", 60], [11, "director", 60], [11, "genre", 50], [12, "genre", 50],
               [13, "genre", 50], [10, "self_loop", 10], [11, "sequel", 12]]
    return ItemAttributes.from_triples(triples, [10, 11, 12, 13], n_entity=70)


def test_item_attributes_keep_item_to_attribute_relations_with_idf():
    attrs = _attributes()
    assert attrs.relations == ["genre", "director"]
    idf = attrs.idf()
    assert idf[60] == pytest.approx(np.log(4 / 2)) and idf[50] == pytest.approx(np.log(4 / 3)) and idf[10] == 0


def test_evidence_term_is_zero_at_initialisation_and_matches_attributes_by_hand():
    attrs = _attributes()
    term = EvidenceTerm(EvidenceConfig(), n_items=4, hidden=8, attributes=attrs)
    builder = EvidenceBuilder(_table(), np.array([False, True, False, False]), [10, 11, 12, 13])
    ev = builder.batch(np.array([[0, 3]]))
    state = torch.randn(1, 8)
    assert torch.count_nonzero(term(state, ev)) == 0
    with torch.no_grad():
        term.attribute_weight.copy_(torch.tensor([1.0, 0.0]))  # genre only
    # the context names entity 50 (genre, idf log 4/3) once: items 1-3 get log(1 + log(2) * log(4/3))
    expected = np.log1p(np.log(2) * np.log(4 / 3))
    assert term(state, ev)[0].tolist() == pytest.approx([0.0, expected, expected, expected], rel=1e-5)
    with torch.no_grad():
        term.attribute_weight.zero_()
        term.item_attribute_weight.copy_(torch.tensor([0.0, 1.0]))  # director, via the context's items 1, 2
    # items 1 and 2 are named; director 60 is item 1's (count 1 -> log 2): items 0 and 1 have it (idf log 2)
    got = term(state, ev)[0].tolist()
    shared = np.log1p(np.log(2) * np.log(2))
    assert got == pytest.approx([shared, shared, 0.0, 0.0], rel=1e-5)


def _fit(term: EvidenceTerm, state: torch.Tensor, ev, targets: torch.Tensor, steps: int) -> None:
    """SGD on the cross-entropy of the term's scores alone."""
    opt = torch.optim.SGD(term.parameters(), lr=0.5)
    for _ in range(steps):
        loss = F.cross_entropy(term(state, ev), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_copy_term_is_learned_from_training_samples():
    """Planted: the answer is the item the seeker named. The term starts at zero, learns a positive
    seeker weight, and then ranks that item first."""
    torch.manual_seed(0)
    term = EvidenceTerm(EvidenceConfig(attributes=False, item_attributes=False), n_items=4, hidden=8,
                        attributes=None)
    builder = EvidenceBuilder(_table(), np.array([False, True, False, False]), [10, 11, 12, 13])
    ev = builder.batch(np.array([[0, 3], [0, 1]]))  # both contexts: item 1 named by the seeker
    targets = torch.tensor([1, 1])
    state = torch.randn(2, 8)
    before = term.item_weight.detach().clone()
    _fit(term, state, ev, targets, steps=20)
    assert not torch.equal(term.item_weight.detach(), before)
    assert term.item_weight[ITEM_FEATURES.index("by_seeker")] > 0
    assert term(state, ev).argmax(1).tolist() == [1, 1]


def test_attribute_gate_starts_ungated_and_learns_a_per_context_weight():
    """Planted: context A's stated genre points to its target, context B's to a wrong item. A shared
    relation weight cannot serve both; the zero-initialised gate learns to read them apart."""
    torch.manual_seed(0)
    attrs = _attributes()
    cfg = EvidenceConfig(items=False, item_attributes=False, attribute_gate=True)
    term = EvidenceTerm(cfg, n_items=4, hidden=8, attributes=attrs)
    plain = EvidenceTerm(EvidenceConfig(items=False, item_attributes=False), n_items=4, hidden=8, attributes=attrs)
    builder = EvidenceBuilder(_table(), np.array([False, True, False, False]), [10, 11, 12, 13])
    ev = builder.batch(np.array([[0, 3], [0, 3]]))
    state = torch.tensor([[1.0] * 8, [-1.0] * 8])
    with torch.no_grad():
        term.attribute_weight.copy_(torch.tensor([0.5, 0.0]))
        plain.attribute_weight.copy_(torch.tensor([0.5, 0.0]))
    assert torch.equal(term(state, ev), plain(state, ev))  # the gate is zero at the start
    targets = torch.tensor([1, 0])  # genre 50 is items 1-3's: right for A, wrong for B
    _fit(term, state, ev, targets, steps=30)
    weights = term.attribute_weight + term.attribute_gate(state)
    assert weights[0, 0] > 0 > weights[1, 0]
    assert term(state, ev).argmax(1).tolist() == [1, 0]
    assert EvidenceTerm(EvidenceConfig(), n_items=4, hidden=8, attributes=attrs).attribute_gate is None


def test_evidence_config_is_validated_and_needs_a_kg_for_attributes():
    with pytest.raises(UserError, match="unknown key 'item'"):
        EvidenceConfig.from_dict({"item": True})
    with pytest.raises(UserError, match="evidence.lr"):
        EvidenceConfig.from_dict({"lr": 0})
    with pytest.raises(UserError, match="set both to false"):
        EvidenceTerm(EvidenceConfig(), n_items=4, hidden=8, attributes=None)
