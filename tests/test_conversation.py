"""The conversation stage (lotcrs_plugin.system.conversation and lotcrs_plugin.model.conversation):
the retrieved prompt holds the neighbours' responses, the recommended item fills the <movie> slot,
the stage trains (the loss falls) and tests with CRSLab's conversation metrics in range, the
LOT-CRS system runs it after the recommender and converses in --interact driven by a pipe, and a
bad config key gets one line. The decoders are tiny GPT-2 models built from a config with the real
GPT-2 BPE files (../shared/models/gpt2-bpe); the tests that need them skip where they are absent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lotcrs_plugin.data.item_vocab import ItemVocab
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.conversation.config import ConversationConfig
from lotcrs_plugin.model.conversation.memory import ResponseMemory
from lotcrs_plugin.model.conversation.prompt import (
    ITEM_TAG, RETRIEVED_TAG, SLOT, PromptEncoder, conversation_samples, fill_slot, slot_items,
)

from support import REPO_ROOT, SHARED_DATA

GPT2_BPE = Path(os.environ.get("LOTCRS_GPT2_BPE", SHARED_DATA.parent / "models" / "gpt2-bpe"))
ITEMS = ItemVocab([11, 12, 13], ["<Hidden_Echo>", "<Secret_River>", "<Blue_Night>"],
                  ["Hidden Echo", "Secret River", "Blue Night"])
GENRES = ["comedy", "horror", "western"]  # item k is the genre k film


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt2(folder: Path, n_embd: int = 32, small_vocab: bool = False) -> Path:
    """A random 2-layer GPT-2 with the real GPT-2 tokenizer (``small_vocab``: its first 3,000 merges,
    support.small_bpe: 15x fewer rows in the embedding and the LM head, so that a few epochs
    teach it the synthetic replies), saved to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    if small_vocab:
        from support import small_bpe

        vocab, merges = small_bpe()
        tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    else:
        tok = GPT2Tokenizer(str(GPT2_BPE / "vocab.json"), str(GPT2_BPE / "merges.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=n_embd, n_layer=2, n_head=2, n_positions=1024)
                    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory) -> Path:
    if not (GPT2_BPE / "vocab.json").is_file():
        pytest.skip(f"the GPT-2 BPE files are not at {GPT2_BPE} (set LOTCRS_GPT2_BPE)")
    return tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="module")
def small_gpt2_path(tmp_path_factory) -> Path:
    if not (GPT2_BPE / "vocab.json").is_file():
        pytest.skip(f"the GPT-2 BPE files are not at {GPT2_BPE} (set LOTCRS_GPT2_BPE)")
    return tiny_gpt2(tmp_path_factory.mktemp("small_gpt2"), n_embd=64, small_vocab=True)


def dialog(k: int, n: int) -> dict:
    """Seeker asks for genre k; the Recommender names item k; a closing exchange."""
    genre, title = GENRES[k], ITEMS.display_names[k]
    return {"conv_id": f"d{n}", "dialog": [
        {"role": "Seeker", "raw_text": f"Hi, I would like a {genre} movie.", "movies": [], "entity": []},
        {"role": "Recommender", "raw_text": f"You should watch {title}.", "movies": [ITEMS.entity_names[k]],
         "entity": []},
        {"role": "Seeker", "raw_text": "Thanks!", "movies": [], "entity": []},
        {"role": "Recommender", "raw_text": "Enjoy the movie!", "movies": [], "entity": []},
    ]}


# ---- slots and prompts -----------------------------------------------------------------------

def test_the_recommended_item_fills_the_slot():
    text, named = slot_items("Have you seen Hidden Echo? hidden echo is great, unlike Blue Night.",
                             ["<Hidden_Echo>", "<Blue_Night>", "<Not_In_Catalog>"], ITEMS)
    assert text == f"Have you seen {SLOT}? {SLOT} is great, unlike {SLOT}." and named == [0, 2]
    assert slot_items("No title here.", [], ITEMS) == ("No title here.", [])
    assert fill_slot(f"Try {SLOT}, then {SLOT} again.", "Secret River") == "Try Secret River, then Secret River again."
    samples = conversation_samples([dialog(1, 0)], ITEMS)
    # every Recommender turn after the first: the recommendation (slotted) and the closing line
    assert [(s.turn, s.response, s.items) for s in samples] == [(1, f"You should watch {SLOT}.", [1]),
                                                                (3, "Enjoy the movie!", [])]
    assert samples[0].context == ["Hi, I would like a horror movie."]
    assert samples[0].reference == "You should watch Secret River."


def test_the_retrieved_prompt_holds_the_neighbours_responses():
    """A planted store: the query is nearest to entry 2, then entry 0; entry 1 is far."""
    keys = np.array([[1.0, 0.2, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
    responses = [f"{SLOT} is a fine comedy.", f"{SLOT} is scary.", f"You will laugh at {SLOT}."]
    memory = ResponseMemory.build(keys, [0, 2, 0], responses)
    query = np.array([[1.0, 0.9, 0.0]], np.float32)
    assert memory.neighbours(query, 2) == [[responses[2], responses[0]]]
    assert memory.neighbours(query, 10) == [[responses[2], responses[0], responses[1]]]  # k capped by the store

    words: dict[str, int] = {}

    def tokenize(text: str) -> list[int]:  # one id per word: the prompt reads back exactly
        return [words.setdefault(w, len(words) + 1) for w in text.split()]

    def read(ids: list[int]) -> list[str]:
        """The prompt's turns (end-of-text is id 0)."""
        back = {i: w for w, i in words.items()}
        turns, cur = [], []
        for i in ids:
            if i == 0:
                turns.append(" ".join(cur))
                cur = []
            else:
                cur.append(back[i])
        return turns + ([" ".join(cur)] if cur else [])

    enc = PromptEncoder(tokenize, 0, max_context_length=64, max_prompt_length=64, max_response_length=16)
    context = ["I want something funny."]
    near = memory.neighbours(query, 2)[0]
    assert read(enc.prompt(context, near, "Hidden Echo")) == [
        RETRIEVED_TAG + responses[2], RETRIEVED_TAG + responses[0], ITEM_TAG + "Hidden Echo", context[0]]
    # the budget keeps the nearest responses whole and drops the farther ones (7 + 7 tokens > 9)
    short = PromptEncoder(tokenize, 0, max_context_length=64, max_prompt_length=9, max_response_length=16)
    assert read(short.prompt(context, near, None)) == [RETRIEVED_TAG + responses[2], context[0]]
    # the ablations leave their part out; the context keeps its last tokens
    bare = PromptEncoder(tokenize, 0, max_context_length=3, max_prompt_length=64, max_response_length=16,
                         retrieved_prompt=False, recommended_item=False)
    assert read(bare.prompt(context, near, "Hidden Echo")) == ["something funny."]
    assert read(enc.response("You should watch <movie>. Really, you should.")) == ["You should watch <movie>. Really, you should."]


# ---- the stage on a planted recommender --------------------------------------------------------

class PlantedView:
    """A RecView whose recommender is right (item k for genre k) and whose context vectors are
    one-hot by genre; each item has two simulated responses."""

    items = ITEMS

    def __init__(self, n: dict[str, int]):
        self.splits = {split: [dialog(i % 3, i) for i in range(count)] for split, count in n.items()}

    def dialogs(self, split):
        return self.splits[split]

    def rec_pass(self, dialogs, samples):
        genre = [next(k for k, g in enumerate(GENRES) if g in dialogs[d]["dialog"][0]["raw_text"])
                 for d, _ in samples]
        return np.asarray(genre, np.int64), np.eye(3, dtype=np.float32)[genre]

    def simulated_memory(self):
        responses = [f"{SLOT} is the {g} film for you." for g in GENRES] + [f"Try {SLOT}." for _ in GENRES]
        return ResponseMemory.build(np.vstack([np.eye(3), np.eye(3)]).astype(np.float32), [0, 1, 2, 0, 1, 2],
                                    responses)


def test_the_stage_trains_and_tests_with_the_metrics_in_range(gpt2_path, tmp_path):
    from lotcrs_plugin.system.conversation import ConversationStage

    cfg = ConversationConfig.from_dict({"enabled": True, "backbone_path": str(gpt2_path), "k": 2, "epochs": 3,
                                        "lr": 0.01, "batch_size": 8, "max_new_tokens": 8, "log_every": 1000})
    stage = ConversationStage(cfg, tmp_path / "run", torch.device("cpu"), seed=0)
    view = PlantedView({"train": 48, "valid": 6, "test": 6})
    report = stage.fit(view)
    losses = [h["train_loss"] for h in stage.history]
    ppls = [h["valid"]["ppl"] for h in stage.history]
    assert losses[-1] < 0.6 * losses[0] and ppls[-1] < ppls[0]
    assert stage.best_epoch == int(np.argmin(ppls))
    assert report["replies"] == 12 and report["ref_item_share"] == 0.5  # 6 dialogs x 2 Recommender turns
    for key in ("bleu@1", "bleu@2", "item_share"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["dist@1"] > 0 and all(report[f"dist@{k}"] >= 0 for k in (2, 3, 4))
    assert 1.0 <= report["ppl"] < ppls[0]
    assert report["item_share"] > 0  # the planted recommendations are learnt: replies name the item
    summary = json.loads((tmp_path / "run" / "conversation.json").read_text())
    assert summary["best_epoch"] == stage.best_epoch and summary["test"] == report
    assert {"context", "reference", "recommended", "reply"} <= set(summary["examples"][0])
    # the retrieved prompt of a test sample holds its neighbours' responses, then the recommended item
    prepared = stage.prepare(view, "test", train=False)
    text = stage.decoder.tokenizer.decode(prepared.prompts[0])
    assert "similar: <movie> is the comedy film for you." in text and "recommend: Hidden Echo" in text
    # the kept decoder and memory reload, and reply with the recommended item in the slot
    again = ConversationStage(cfg, tmp_path / "run2", torch.device("cpu"), seed=0)
    stage.save(tmp_path / "saved")
    again.load(tmp_path / "saved")
    turns = view.dialogs("test")[1]["dialog"][:1]
    assert again.reply(view, turns, 1) == stage.reply(view, turns, 1)


# ---- in the LOT-CRS system -----------------------------------------------------------------------

def conversation_opt(backbone_paths: dict, gpt2: Path, **conv) -> dict:
    from support import tiny_opt

    opt = tiny_opt("bert", backbone_paths["bert"], pretrain=False, run_name="t_conv")
    opt["conversation"] = {"enabled": True, "backbone_path": str(gpt2), "k": 3, "epochs": 6, "lr": 0.01,
                           "batch_size": 16, "max_context_length": 64, "max_prompt_length": 64,
                           "max_response_length": 24, "max_new_tokens": 16, "max_eval_samples": 24, **conv}
    opt["model_file"] = "t_conv_system.pth"
    return opt


def test_the_system_converses_after_recommending_and_interacts_through_a_pipe(small_gpt2_path, lotcrs_home,
                                                                               tmp_path):
    from lotcrs_plugin import registry
    from lotcrs_plugin.runner import run

    registry.register_all()
    opt = conversation_opt({"bert": "builtin:tiny-bert"}, small_gpt2_path)
    result = run(opt, save_system=True)
    assert result.test["longtail"]["n_samples"] > 0  # the recommender was tested first
    summary = json.loads((lotcrs_home / "save" / "t_conv_conv" / "conversation.json").read_text())
    report = summary["test"]
    assert report["replies"] == 24 and 1.0 <= report["ppl"] < 50_000
    assert 0 <= report["bleu@1"] <= 1 and 0 <= report["item_share"] <= 1
    ppls = [h["valid"]["ppl"] for h in summary["history"]]
    assert len(ppls) == 6 and ppls[-1] < ppls[0] and summary["best_epoch"] == int(np.argmin(ppls))  # the kept epoch: best validation ppl
    conv = lotcrs_home / "save" / "t_conv_system.conv"
    assert (conv / "decoder" / "config.json").is_file() and (conv / "memory" / "responses.json").is_file()

    config = tmp_path / "conv.yaml"
    config.write_text(yaml.safe_dump(opt), encoding="utf-8")
    messages = ["Hi! I am looking for a good comedy movie.", "I really liked it.", "Anything else?",
                "Something fun would be nice."]
    cmd = [sys.executable, "-m", "lotcrs_plugin", "run", "--config", str(config), "--restore-system", "--interact"]
    env = {**os.environ, "LOTCRS_HOME": str(lotcrs_home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, input="\n".join(messages) + "\n", env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]  # the end of the input ends the dialog cleanly
    replies = [line.split("Recommender: ", 1)[1] for line in out.stdout.splitlines() if "Recommender: " in line]
    assert len(replies) == len(messages), out.stdout[-2000:]
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.dataset import dataset_folder

    names = ItemVocab.from_folder(dataset_folder(SyntheticConfig.from_dict(opt["synthetic"]))).display_names
    said = [r.split(" (also:")[0] for r in replies]  # the generated reply, before the list of other items
    # every reply line names catalog items (the recommender's list beside the generated text); whether the
    # tiny decoder writes the slot itself depends on what it learned in six epochs, so the slot's filling
    # is tested with a planted reply (test_the_recommended_item_fills_the_slot), not here
    assert all(any(n in r for n in names) for r in replies), replies
    assert "<movie>" not in " ".join(said)  # every slot filled


# ---- the config block --------------------------------------------------------------------------

BAD_BLOCKS = [
    ({"epoch": 3}, ["block 'conversation': unknown key 'epoch'", "known keys: enabled, backbone_path, k,",
                    "did you mean 'epochs'?"]),
    ({"decoding": "nucleus"}, ["key 'decoding' must be greedy or beam or top_p, not 'nucleus'"]),
    ({"backbone_path": "/no/such/gpt2"}, ["key 'backbone_path': no folder '/no/such/gpt2'",
                                          "microsoft/DialoGPT-small"]),
    ({"k": 0}, ["key 'k' must be at least 1, not 0"]),
    ({"lr": "fast"}, ["key 'lr' must be a number, not 'fast'"]),
    ({"min_new_tokens": 50}, ["key 'min_new_tokens' must be at most max_new_tokens (40)"]),
    ({"select": "bleu"}, ["key 'select' must be one of ppl, bleu@1"]),
]


@pytest.mark.parametrize("block, fragments", BAD_BLOCKS, ids=[str(b) for b, _ in BAD_BLOCKS])
def test_a_bad_conversation_key_is_one_line_before_any_data(block, fragments):
    from lotcrs_plugin import config as run_config

    opt = {"dataset": "synthetic", "model": "LOTCRS", "backbone": "bert", "backbone_path": "builtin:tiny-bert",
           "conversation": block}
    with pytest.raises(UserError) as err:
        run_config.load(opt)  # the checks that run before any data is read
    message = str(err.value)
    assert len(message.splitlines()) == 1
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_defaults_are_the_papers_and_hub_names_pass():
    cfg = ConversationConfig.from_dict(None)
    assert (cfg.enabled, cfg.backbone_path, cfg.k, cfg.epochs, cfg.lr, cfg.batch_size) == (
        False, "microsoft/DialoGPT-small", 10, 10, 1e-4, 8)
    assert ConversationConfig.from_dict({"backbone_path": "gpt2", "lr": 1}).lr == 1.0


def test_attribute_words_of_a_message_are_linked_to_entities():
    from lotcrs_plugin.data.entity_linking import AttributeLinker

    dbp = "<http://dbpedia.org/resource/{}>".format
    link = AttributeLinker([dbp("Science_fiction_film"), dbp("Fiction"), dbp("Chris_Evans_(actor)"), dbp("It"), None],
                           ["science fiction", "fiction", "Chris Evans", "it", "no entity"])
    assert link("I love Science Fiction, and chris evans! Fiction too.") == [
        dbp("Science_fiction_film"), dbp("Chris_Evans_(actor)"), dbp("Fiction")]
    assert link("Is it good? no entity here") == []  # too short to look for; attributes without an entity
