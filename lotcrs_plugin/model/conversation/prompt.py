"""Conversation samples and their prompts: the ``<movie>`` slot, the retrieved prompt, the
recommended item.

A sample is a Recommender turn with at least one turn before it (CRSLab's conversation samples):
its context is the turns before it, its response the turn's text with every item it names
replaced by :data:`SLOT` (CRSLab's ``<movie>`` convention). A generated response names no title
of its own: :func:`fill_slot` puts the recommender's item in the slot, so that the response and
the recommendation agree.

The decoder reads, as GPT-2 / DialoGPT turns separated by the end-of-text token::

    similar: <response of neighbour 1> EOS ... similar: <response of neighbour k> EOS
    recommend: <title of the recommended item> EOS
    <turn 1> EOS ... <turn n> EOS  <response> EOS

the retrieved prompt (the responses of the k simulated contexts nearest to the real one, slotted
too, nearest first, cut after ``max_prompt_length`` tokens), the recommended item, the context
(its last ``max_context_length`` tokens) and, for training, the response (its first
``max_response_length`` tokens). Either part of the prompt can be left out (the ablations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from lotcrs_plugin.data.item_vocab import ItemVocab, _find_all, _item_surfaces

SLOT = "<movie>"
RETRIEVED_TAG = "similar: "
ITEM_TAG = "recommend: "
RECOMMENDER = "Recommender"


def turn_text(turn: Mapping[str, Any]) -> str:
    text = turn.get("raw_text")
    return text if isinstance(text, str) else " ".join(turn.get("text") or [])


def slot_items(text: str, movies: Iterable[str], items: ItemVocab) -> tuple[str, list[int]]:
    """(``text`` with the items of ``movies`` (entity names) written as :data:`SLOT`, their
    catalog positions). A title is found as the recommendation samples find it (its full name
    everywhere, its name without the "(year)" once)."""
    lower = text.lower()
    spans: list[tuple[int, int]] = []
    named: list[int] = []
    for name in movies or ():
        k = items.index_of.get(name)
        if k is None:
            continue
        if k not in named:
            named.append(k)
        for surface, every in _item_surfaces(name, items.display_names[k]):
            found = _find_all(lower, surface)
            if found:
                spans += found if every else found[:1]
                break
    if not spans:
        return text, named
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    pieces, pos = [], 0
    for start, end in spans:
        if start < pos:  # inside a longer or earlier mention
            continue
        pieces += [text[pos:start], SLOT]
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces), named


def fill_slot(text: str, name: str) -> str:
    """The response with the recommended item's title in every slot."""
    return text.replace(SLOT, name)


@dataclass
class ConvSample:
    """One Recommender turn: dialog ``dialog`` (its index in the split), turn ``turn`` (the
    context is turns [0, turn)); ``response`` slotted, ``reference`` as written, ``items`` the
    catalog positions it names."""

    dialog: int
    turn: int
    context: list[str]
    response: str
    reference: str
    items: list[int] = field(default_factory=list)


def conversation_samples(dialogs: Sequence[Mapping[str, Any]], items: ItemVocab) -> list[ConvSample]:
    """Every Recommender turn after the first turn of its dialog."""
    out: list[ConvSample] = []
    for d, conv in enumerate(dialogs):
        turns = conv["dialog"]
        texts = [turn_text(t) for t in turns]
        for t, turn in enumerate(turns):
            if t == 0 or turn.get("role") != RECOMMENDER or not texts[t].strip():
                continue
            slotted, named = slot_items(texts[t], turn.get("movies") or (), items)
            out.append(ConvSample(d, t, texts[:t], slotted, texts[t], named))
    return out


class PromptEncoder:
    """Token ids of prompts and responses (see the module docstring); each distinct text is
    tokenized once (neighbour responses and context turns repeat across samples)."""

    def __init__(self, tokenize: Callable[[str], list[int]], eos_id: int, *, max_context_length: int,
                 max_prompt_length: int, max_response_length: int, retrieved_prompt: bool = True,
                 recommended_item: bool = True):
        self._tokenize = tokenize
        self.eos_id = int(eos_id)
        self.max_context_length = max_context_length
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.retrieved_prompt = retrieved_prompt
        self.recommended_item = recommended_item
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        got = self._cache.get(text)
        if got is None:
            got = self._cache[text] = list(self._tokenize(text))
        return got

    def prompt(self, context: Sequence[str], neighbours: Sequence[str], item_name: str | None) -> list[int]:
        """The decoder's input before the response."""
        out: list[int] = []
        if self.retrieved_prompt:
            for response in neighbours:  # nearest first; the farther ones give way to the budget
                piece = self.ids(RETRIEVED_TAG + response) + [self.eos_id]
                if len(out) + len(piece) > self.max_prompt_length:
                    break
                out += piece
        if self.recommended_item and item_name:
            out += self.ids(ITEM_TAG + item_name) + [self.eos_id]
        ctx: list[int] = []
        for turn in context:
            ctx += self.ids(turn) + [self.eos_id]
        return out + ctx[-self.max_context_length:]

    def response(self, text: str) -> list[int]:
        """The training target: the response's first tokens and the end-of-text token."""
        return self.ids(text)[:self.max_response_length] + [self.eos_id]

    @property
    def max_prompt_tokens(self) -> int:
        """An upper bound of len(prompt(...)) without the item tag (whose title length varies)."""
        return (self.max_prompt_length if self.retrieved_prompt else 0) + self.max_context_length


__all__ = ["ConvSample", "ITEM_TAG", "PromptEncoder", "RETRIEVED_TAG", "SLOT", "conversation_samples", "fill_slot",
           "slot_items", "turn_text"]
