"""LOT-CRS backbones (lotcrs_plugin.model.backbones) on tiny models built here from configs:
item tokens, the prompt format, the verbaliser, save/load, the registry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.backbones import (
    Backbone, EntityKG, TokenBatch, backbone_names, build_backbone, load_backbone, register_backbone,
)
from lotcrs_plugin.registry import RegistryError

from support import NAMES, tiny_bart, tiny_bert, tiny_unicrs

MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))
ENTITY_IDS = [5, 6, 7]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads stall each other
    (a tiny model's step takes 100x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_kg(n_entity: int = 12) -> EntityKG:
    heads = torch.tensor([1, 2, 5, 6, 7, 5])
    tails = torch.tensor([5, 6, 1, 2, 5, 7])
    return EntityKG(n_entity, 3, torch.stack([heads, tails]), torch.tensor([0, 1, 0, 1, 2, 2]))


BUILDERS = {"bert": tiny_bert, "bart": tiny_bart, "unicrs": tiny_unicrs}


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_backbones")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _batch(backbone: Backbone, text: str, entity_at: int | None = None, entity: int = 0) -> TokenBatch:
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"] + list(backbone.sep_ids)
    out, kw, ent, pos = backbone.format_input(np.asarray(ids), prompt=True, max_length=64)
    x = torch.as_tensor(out)[None].repeat(2, 1)
    entities = torch.zeros_like(x)
    if entity_at is not None:
        entities[:, entity_at] = entity
    return TokenBatch(x, torch.ones_like(x), torch.zeros_like(x, dtype=torch.bool), entities, torch.tensor([pos, pos]))


# ---- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "bart", "unicrs"])
def test_item_tokens_start_at_the_mean_of_their_name_tokens(tiny_paths, name):
    backbone = build_backbone(name, str(tiny_paths[name]), kg=tiny_kg())
    vocabularies = backbone._vocabularies()
    before = [v.embeddings().weight.detach().clone() for v in vocabularies]
    sizes = [len(v.tokenizer) for v in vocabularies]
    ids = backbone.add_item_tokens(NAMES, ENTITY_IDS)
    assert ids.tolist() == list(range(sizes[0], sizes[0] + len(NAMES)))
    assert backbone.tokenizer.convert_ids_to_tokens(ids.tolist()) == ["<item_0>", "<item_1>", "<item_2>"]
    for voc, old, size in zip(vocabularies, before, sizes):  # unicrs: the decoder's and the text encoder's
        weight = voc.embeddings().weight.detach()
        assert weight.shape[0] == size + len(NAMES)
        assert torch.equal(weight[:size], old)  # the old rows are untouched
        for k, item in enumerate(NAMES):
            name_ids = voc.tokenizer(voc.name_prefix + item, add_special_tokens=False)["input_ids"]
            assert len(name_ids) >= 1 and max(name_ids) < size
            torch.testing.assert_close(weight[size + k], old[name_ids].mean(0))
    # the verbaliser: item scores are the item-token columns of the full prediction head
    backbone.eval()
    with torch.no_grad():
        batch = _batch(backbone, "hi i like <item_0> with anna", entity_at=2, entity=7)
        hidden = backbone.encode(batch)
        assert hidden.shape == (*batch.input_ids.shape, backbone.hidden_size)
        at_mask = hidden[torch.arange(2), batch.mask_positions]
        full = backbone.lm_logits(at_mask)
        assert full.shape == (2, backbone.vocab_size)
        torch.testing.assert_close(backbone.item_logits(at_mask), full[:, ids], rtol=1e-5, atol=1e-5)
        for pooling in ("cls", "mean", "first_last"):
            assert backbone.context_representation(batch, pooling).shape == (2, backbone.hidden_size)


def test_item_token_is_one_token_in_text_and_prompt_format(tiny_paths):
    backbone = build_backbone("bert", str(tiny_paths["bert"]))
    backbone.add_item_tokens(NAMES)
    ids = backbone.tokenizer("i like <item_1> and <item_2>!", add_special_tokens=False)["input_ids"]
    assert backbone.first_item_id + 1 in ids and backbone.first_item_id + 2 in ids
    tok = backbone.tokenizer
    context = np.arange(100, 140) % 30 + 5  # 40 context tokens
    out, kw, ent, pos = backbone.format_input(context, np.ones(40, bool), np.arange(40), prompt=True, max_length=20)
    assert len(out) == 20
    assert out[0] == tok.cls_token_id and out[-1] == tok.sep_token_id and out[pos] == tok.mask_token_id
    tail = tok.convert_ids_to_tokens(out[-5:].tolist())
    assert tail == ["you", "should", "watch", "[MASK]", "[SEP]"]
    # cut from the left: the most recent tokens stay, aligned with their keyword/entity marks
    n_ctx = 20 - 1 - 5
    assert out[1:1 + n_ctx].tolist() == context[-n_ctx:].tolist()
    assert ent[1:1 + n_ctx].tolist() == list(range(40 - n_ctx, 40)) and not kw[0] and not kw[-5:].any()
    backbone.set_prompt("so [MASK] it is")
    assert tok.convert_ids_to_tokens(backbone.prompt_ids.tolist()) == ["so", "[MASK]", "it", "is"]
    with pytest.raises(UserError, match=r"\[MASK\] exactly once"):
        backbone.set_prompt("you should watch it")


def test_bert_without_head_gets_a_fresh_tied_one_and_a_saved_head_is_kept(tmp_path):
    fresh = build_backbone("bert", str(tiny_bert(tmp_path / "encoder_only")))
    model = fresh.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.count_nonzero(model.cls.predictions.bias) == 0
    with_head = tiny_bert(tmp_path / "with_head", with_head=True)
    from transformers import BertForMaskedLM

    saved = BertForMaskedLM.from_pretrained(with_head)
    loaded = build_backbone("bert", str(with_head)).model
    dense = loaded.cls.predictions.transform.dense.weight
    torch.testing.assert_close(dense, saved.cls.predictions.transform.dense.weight)


@pytest.fixture(scope="module")
def unicrs_with_items(tiny_paths) -> Backbone:
    backbone = build_backbone("unicrs", str(tiny_paths["unicrs"]), kg=tiny_kg())
    backbone.add_item_tokens(NAMES, ENTITY_IDS)
    return backbone


@pytest.mark.parametrize("name", ["bert", "unicrs"])
def test_saved_backbone_loads_back_with_its_item_tokens(tiny_paths, unicrs_with_items, tmp_path, name):
    if name == "unicrs":
        backbone = unicrs_with_items
    else:
        backbone = build_backbone(name, str(tiny_paths[name]))
        backbone.add_item_tokens(NAMES, ENTITY_IDS)
    with torch.no_grad():
        for p in backbone.parameters():  # make the saved state differ from the initial one
            p.add_(0.01)
    backbone.save_pretrained(tmp_path / "export")
    again = load_backbone(tmp_path / "export", kg=tiny_kg())
    assert (again.n_items, again.first_item_id, again.item_entity_ids) == (3, backbone.first_item_id, ENTITY_IDS)
    if name == "bert":
        assert build_backbone(name, str(tmp_path / "export")).n_items == 3  # backbone_path: <export>
    backbone.eval()
    again.eval()
    with torch.no_grad():
        batch = _batch(backbone, "hi i like <item_0>", entity_at=1, entity=5)
        torch.testing.assert_close(again.encode(batch), backbone.encode(batch))
    with pytest.raises(UserError, match="holds a"):
        load_backbone(tmp_path / "export", kg=tiny_kg(), expect="bart")


def test_unicrs_knowledge_prompt_conditions_the_decoder(tiny_paths, unicrs_with_items):
    backbone = unicrs_with_items
    backbone.eval()
    with torch.no_grad():
        plain = backbone.encode(_batch(backbone, "hi i like it"))
        with_entity = backbone.encode(_batch(backbone, "hi i like it", entity_at=1, entity=6))
    assert not torch.allclose(plain, with_entity)
    with pytest.raises(UserError, match="entity KG"):
        build_backbone("unicrs", str(tiny_paths["unicrs"]), kg=None)


def test_backbone_registry_lists_and_refuses():
    assert {"bert", "bart", "unicrs"} <= set(backbone_names())
    with pytest.raises(UserError, match=r"unknown backbone 'gpt9'; valid backbones: bart, bert, .*unicrs"):
        build_backbone("gpt9", "anything")

    class Other(Backbone):
        pass

    with pytest.raises(RegistryError, match="already taken"):
        register_backbone("bert")(Other)
    with pytest.raises(RegistryError, match="not a subclass"):
        register_backbone("plain")(dict)
    assert "plain" not in backbone_names()


def test_missing_model_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        build_backbone("bert", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="text_encoder/ and decoder/"):
        build_backbone("unicrs", str(tmp_path), kg=tiny_kg())


@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason="all-MiniLM-L6-v2 not installed "
                    "(../shared/models/get-minilm.sh)")
def test_minilm_loads_with_a_fresh_head_and_item_tokens():
    backbone = build_backbone("bert", str(MINILM))
    emb = backbone.model.get_input_embeddings().weight.detach().clone()
    backbone.add_item_tokens(["The Matrix (1999)"])
    ids = backbone.tokenizer("the matrix", add_special_tokens=False)["input_ids"]
    ids2 = backbone.tokenizer("The Matrix (1999)", add_special_tokens=False)["input_ids"]
    assert len(ids2) > len(ids)
    torch.testing.assert_close(backbone.model.get_input_embeddings().weight[backbone.first_item_id].detach(),
                               emb[ids2].mean(0))
    assert backbone.model.get_output_embeddings().weight is backbone.model.get_input_embeddings().weight
