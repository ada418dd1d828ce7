"""What several test modules share, that is not a fixture (fixtures: conftest.py): tiny models
built from configs, small dialogs, the tiny LOT-CRS config, and building a system from a config.
Test modules import from here, never from each other."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from lotcrs_plugin import config as run_config
from lotcrs_plugin import registry
from lotcrs_plugin.data.item_vocab import ItemVocab

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LOTCRS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
GPT2_BPE = Path(os.environ.get("LOTCRS_GPT2_BPE", SHARED_DATA.parent / "models" / "gpt2-bpe"))
DEMO = REPO_ROOT / "lotcrs_plugin" / "configs" / "lotcrs_demo.yaml"
SMALL = {"n_items": 60, "n_conversations": 160, "seed": 3}  # the small synthetic dataset of the pipeline tests
WORDS = ("hi i like movies with you should watch the a great comedy film directed by hidden echo city secret "
         "river anna berg it is so and").split()
NAMES = ["Hidden Echo (1984)", "Secret River (1990)", "Anna"]
BPE = Optional[Callable[[], tuple]]  # () -> (vocab, merges) of a byte-level BPE


# ---- tiny models ---------------------------------------------------------------------------

def shipped_configs() -> list[Path]:
    """Every YAML config the project ships: crslab_configs/ (all folders) and the package's own."""
    return (sorted((REPO_ROOT / "crslab_configs").rglob("*.yaml"))
            + sorted((REPO_ROOT / "lotcrs_plugin" / "configs").glob("*.yaml")))


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


def roberta_bpe(bpe: BPE = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """RoBERTa's layout of the same BPE: <s> <pad> </s> <unk> first, <mask> last (ids differ from GPT-2's)."""
    vocab, merges = (bpe or bpe_files)()
    out = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        out.setdefault(token, len(out))
    out["<mask>"] = len(out)
    return out, merges


def tiny_bart(folder: Path, bpe: BPE = None) -> Path:
    """A 2-layer BART (hidden 32) with RoBERTa's tokenizer over ``bpe()`` (default: bpe_files)."""
    from transformers import BartConfig, BartForConditionalGeneration, RobertaTokenizer

    tok = RobertaTokenizer(*roberta_bpe(bpe))
    tok.save_pretrained(folder)
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=160,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def tiny_unicrs(folder: Path, bpe: BPE = None) -> Path:
    """folder/decoder (GPT-2, 2 layers, hidden 32) and folder/text_encoder (RoBERTa, same size)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, RobertaConfig, RobertaModel, RobertaTokenizer

    vocab, merges = (bpe or bpe_files)()
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(folder / "decoder")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512)).save_pretrained(
        folder / "decoder")
    etok = RobertaTokenizer(*roberta_bpe(bpe))
    etok.save_pretrained(folder / "text_encoder")
    config = RobertaConfig(vocab_size=len(etok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=520, pad_token_id=etok.pad_token_id)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder / "text_encoder")
    return folder


def small_bpe(n_merges: int = 3000):
    """GPT-2's byte-level BPE cut to its first merges (a valid BPE: its byte alphabet, then the
    results of the merges kept, in order): 25x fewer rows in every embedding and LM head."""
    vocab, merges = bpe_files()
    if not merges:
        return vocab, merges
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    kept = dict(by_id[:256 + n_merges])
    kept["<|endoftext|>"] = len(kept)
    return kept, merges[:n_merges]


# ---- small dialogs -------------------------------------------------------------------------

def turn(role, text, movies=(), entity=()):
    return {"role": role, "text": text.lower().split(), "raw_text": text, "movies": list(movies),
            "entity": list(entity), "word": []}


DIALOGS = [
    {"conv_id": "a", "dialog": [
        turn("Seeker", "Hi, I love comedy movies with Anna Berg.", entity=["comedy", "Anna Berg"]),
        turn("Recommender", "Have you seen Secret River (1990)?", movies=["Secret River (1990)"]),
        turn("Seeker", "Yes! Anything else?"),
        turn("Recommender", "Then you should watch Hidden Echo (1984).", movies=["Hidden Echo (1984)"]),
    ]},
    {"conv_id": "b", "dialog": [
        turn("Seeker", "I like a great film by Anna Berg.", entity=["Anna Berg"]),
        turn("Recommender", "hidden echo is great.", movies=["Hidden Echo (1984)"]),
    ]},
    {"conv_id": "c", "dialog": [turn("Seeker", "hi"), turn("Recommender", "hi")]},
]
ENTITY2ID = {"Secret River (1990)": 1, "Hidden Echo (1984)": 2, "comedy": 3, "Anna Berg": 4}
ITEMS = ItemVocab([1, 2], ["Secret River (1990)", "Hidden Echo (1984)"], ["Secret River (1990)", "Hidden Echo (1984)"])
DIALOG_WORDS = [w for d in DIALOGS for t in d["dialog"] for w in t["raw_text"].lower().replace("(", " ").replace(")", " ")
         .replace(",", " ").replace(".", " ").replace("?", " ").replace("!", " ").split()]


# ---- the tiny LOT-CRS config and its system ------------------------------------------------

# the paper's scoring path: the verbaliser at the mask, no evidence term (tests of fusion and ranking
# written against Backbone.item_logits use it; the pipeline tests run the defaults)
PAPER_HEAD = {"head": {"type": "verbaliser"},
              "evidence": {"items": False, "attributes": False, "item_attributes": False}}


def tiny_opt(backbone: str, path: str, blocks: dict | None = None, **lotcrs) -> dict:
    """The demo config shrunk to seconds: 2 pre-training steps, one short fine-tuning epoch;
    ``blocks``: top-level blocks set as given (e.g. PAPER_HEAD)."""
    opt = yaml.safe_load(DEMO.read_text())
    opt.update(blocks or {})
    opt["synthetic"] = dict(SMALL)
    opt["simulation"] = {"per_item": 2}
    opt["backbone"], opt["backbone_path"] = backbone, path
    opt["lotcrs_pretrain"] = {"run_name": f"t_{backbone}_pre", "epochs": 1, "max_steps": 2, "batch_size": 4,
                              "grad_accumulation": 1, "lr": 0.01, "max_length": 48, "checkpoint_every": 0,
                              "eval_max_batches": 1, "pooling": "mean"}
    opt["retrieval"] = {"top_k": 4, "max_per_item": 2, "n_neg": 32, "loss_weight": 0.6}
    opt["lotcrs"] = {"run_name": f"t_{backbone}", "epochs": 1, "batch_size": 16, "grad_accumulation": 1,
                     "eval_batch_size": 64, "lr": 0.005, "max_length": 48, "max_train_batches": 2, "impatience": 0,
                     "teacher_epochs": 1, "teacher_max_samples": 16, "teacher_lr": 0.005, **lotcrs}
    return opt


def assert_longtail_in_range(report: dict) -> None:
    ks = report["ks"]
    for part in [report, *report["subsets"].values()]:
        assert part["n_samples"] > 0
        m = part["metrics"]
        for k in ks:
            for name in ("recall", "ndcg", "mrr", "coverage", "tail_coverage", "gini"):
                v = m[f"{name}@{k}"]
                assert v is not None and 0.0 <= v <= 1.0 and not math.isnan(v), (name, k, v)
            assert m[f"avg_popularity@{k}"] >= 0
        assert m["recall@1"] <= m["recall@10"] <= m["recall@50"]
        assert m["coverage@1"] <= m["coverage@10"] <= m["coverage@50"]


def build_system(opt: dict):
    """The CRSLab system of a config, built as `crslab run` builds it (no training)."""
    opt = run_config.validate(opt)
    registry.register_all()
    run_config.check_names(opt)
    crs = run_config.to_crslab_config(opt)
    from crslab.data import get_dataloader, get_dataset
    from crslab.system import get_system

    dataset = get_dataset(crs, crs["tokenize"], False, False)
    loaders = [get_dataloader(crs, split, dataset.vocab)
               for split in (dataset.train_data, dataset.valid_data, dataset.test_data)]
    return get_system(crs, *loaders, dataset.vocab, dataset.side_data)
