"""LOT-CRS backbones (lotcrs_plugin.model.backbones) on tiny models built here from configs:
item tokens, the prompt format, the verbaliser, save/load, the registry."""

from __future__ import annotations

import json
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

from conftest import SHARED_DATA

GPT2_BPE = Path(os.environ.get("LOTCRS_GPT2_BPE", SHARED_DATA.parent / "models" / "gpt2-bpe"))
MINILM = Path(os.path.expanduser("~/.cache/lotcrs/models/all-MiniLM-L6-v2"))
WORDS = ("hi i like movies with you should watch the a great comedy film directed by hidden echo city secret "
         "river anna berg it is so and").split()
NAMES = ["Hidden Echo (1984)", "Secret River (1990)", "Anna"]
ENTITY_IDS = [5, 6, 7]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads stall each other
    (a tiny model's step takes 100x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny models (also used by test_pretrain.py) ----------------------------------------------

def tiny_bert(folder: Path, words=WORDS, with_head: bool = False, dropout: float = 0.1) -> Path:
    """A 2-layer BERT with a WordPiece vocabulary of ``words``, saved like all-MiniLM-L6-v2
    (encoder weights only) unless ``with_head``."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    punct = list("()[],.!?'-:;&")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words) - set(punct)), *punct,
             *(str(d) for d in range(10))]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=160, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    (BertForMaskedLM if with_head else BertModel)(config).save_pretrained(folder)
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable alphabet for the 256 bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real GPT-2 byte-level BPE (../shared/models/gpt2-bpe), else the bare byte alphabet."""
    if (GPT2_BPE / "vocab.json").is_file():
        vocab = json.loads((GPT2_BPE / "vocab.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in (GPT2_BPE / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        return vocab, merges
    alphabet = sorted(_bytes_to_unicode().values())
    return {**{c: i for i, c in enumerate(alphabet)}, "<|endoftext|>": len(alphabet)}, []


def roberta_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """RoBERTa's layout of the same BPE: <s> <pad> </s> <unk> first, <mask> last (ids differ from GPT-2's)."""
    vocab, merges = bpe_files()
    out = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        out.setdefault(token, len(out))
    out["<mask>"] = len(out)
    return out, merges


def tiny_bart(folder: Path) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration, RobertaTokenizer

    tok = RobertaTokenizer(*roberta_bpe())
    tok.save_pretrained(folder)
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=160,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def tiny_unicrs(folder: Path) -> Path:
    """folder/decoder (GPT-2, 2 layers, hidden 32) and folder/text_encoder (RoBERTa, same size)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, RobertaConfig, RobertaModel, RobertaTokenizer

    vocab, merges = bpe_files()
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(folder / "decoder")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512)).save_pretrained(
        folder / "decoder")
    etok = RobertaTokenizer(*roberta_bpe())
    etok.save_pretrained(folder / "text_encoder")
    config = RobertaConfig(vocab_size=len(etok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=520, pad_token_id=etok.pad_token_id)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder / "text_encoder")
    return folder


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
