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

from lotcrs_plugin.data.pretrain_samples import ItemVocab
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.model.conversation.config import ConversationConfig
from lotcrs_plugin.model.conversation.memory import ResponseMemory
from lotcrs_plugin.model.conversation.prompt import (
    ITEM_TAG, RETRIEVED_TAG, SLOT, PromptEncoder, conversation_samples, fill_slot, slot_items,
)

from conftest import REPO_ROOT, SHARED_DATA

GPT2_BPE = Path(os.environ.get("LOTCRS_GPT2_BPE", SHARED_DATA.parent / "models" / "gpt2-bpe"))
needs_bpe = pytest.mark.skipif(not (GPT2_BPE / "vocab.json").is_file(),
                               reason=f"the GPT-2 BPE files are not at {GPT2_BPE} (set LOTCRS_GPT2_BPE)")

ITEMS = ItemVocab([11, 12, 13], ["<Hidden_Echo>", "<Secret_River>", "<Blue_Night>"],
                  ["Hidden Echo", "Secret River", "Blue Night"])
GENRES = ["comedy", "horror", "western"]  # item k is the genre k film


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt2(folder: Path) -> Path:
    """A random 2-layer GPT-2 (hidden 32) with the real GPT-2 tokenizer, saved to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tok = GPT2Tokenizer(str(GPT2_BPE / "vocab.json"), str(GPT2_BPE / "merges.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=1024)
                    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory) -> Path:
    if not (GPT2_BPE / "vocab.json").is_file():
        pytest.skip(f"the GPT-2 BPE files are not at {GPT2_BPE} (set LOTCRS_GPT2_BPE)")
    return tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


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
