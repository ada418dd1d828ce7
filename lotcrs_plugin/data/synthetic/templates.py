"""The synthetic dataset's dialog acts and utterance templates, each compiled once into a
``str.format`` string that yields the utterance's JSON; and the tokenizer of that controlled English."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from lotcrs_plugin.data.synthetic.words import GENERAL_CONCEPTS

# Slots: {item}, {genre}, {mood}, {star}, {director}, {writer} (at most one person slot).
# Slot values come from the utterance's focus item: the next target to recommend, the last
# recommended item, or an item the seeker liked.
FOCUS_NEXT, FOCUS_LAST, FOCUS_LIKED = 0, 1, 2
SEEKER, RECOMMENDER = "Seeker", "Recommender"

ACTS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "s_open": (SEEKER, FOCUS_NEXT, (
        "Hi! I am looking for a good {genre} movie.",
        "Hello, can you recommend a {genre} film?",
        "Hey, I would like to watch a {genre} movie tonight.",
        "Hi there, I am in the mood for something {mood}.",
        "Hello! I love {genre} movies. Any ideas?",
        "Hi, I want to see a movie with {star}.",
    )),
    "s_liked": (SEEKER, FOCUS_LIKED, (
        "I really liked {item}.",
        "Recently I watched {item} and loved it.",
        "My favorite movie is {item}.",
        "I enjoyed {item}, it was so {mood}.",
        "Last week I saw {item}, the acting was great.",
        "One of my favorites is {item} with {star}.",
    )),
    "s_attr": (SEEKER, FOCUS_NEXT, (
        "I like movies with {star}.",
        "Anything directed by {director}?",
        "I usually enjoy films written by {writer}.",
        "I prefer {genre} movies, maybe something {mood}.",
        "I am a big fan of {star}.",
        "Something {mood} would be nice.",
    )),
    # the seeker's stated preference right before a recommendation: a genre and the most telling
    # person of the item to come (one act per person kind, so the kind follows the person chosen)
    "s_pref_star": (SEEKER, FOCUS_NEXT, (
        "I like {genre} movies with {star}.",
        "Do you know a {genre} movie with {star}?",
        "Any {genre} film with {star}?",
    )),
    "s_pref_director": (SEEKER, FOCUS_NEXT, (
        "Any {genre} movie directed by {director}?",
        "I love {genre} films directed by {director}.",
    )),
    "s_pref_writer": (SEEKER, FOCUS_NEXT, (
        "I usually enjoy {genre} films written by {writer}.",
        "Any {genre} movie written by {writer}?",
    )),
    "s_react": (SEEKER, FOCUS_LAST, (
        "I have not seen {item}. Is it good?",
        "Oh, I have seen that one already. Anything else?",
        "That sounds great, I love {star}!",
        "Is it {mood}?",
        "Nice, I like {genre} movies.",
        "I will add {item} to my list.",
    )),
    "s_bye": (SEEKER, FOCUS_LAST, (
        "Thanks, I will watch it. Bye!",
        "Great, thank you for the help!",
        "Perfect, have a nice day!",
    )),
    "r_ask": (RECOMMENDER, FOCUS_NEXT, (
        "Sure! What movies have you liked recently?",
        "Do you have a favorite actor?",
        "What kind of movies do you like?",
        "Happy to help. What was the last movie you enjoyed?",
        "Do you prefer something {mood}?",
    )),
    "r_rec": (RECOMMENDER, FOCUS_NEXT, (
        "You might enjoy {item}, it stars {star}.",
        "Have you seen {item}? It is a great {genre} movie.",
        "I would recommend {item}, directed by {director}.",
        "How about {item}? It is very {mood}.",
        "{item} is a classic {genre} film written by {writer}.",
        "Then you should watch {item}.",
    )),
    "r_info": (RECOMMENDER, FOCUS_LAST, (
        "Yes, it is really {mood}, and {star} is great in it.",
        "It is one of the best {genre} movies I know.",
        "The director, {director}, did a wonderful job.",
        "The story is {mood} and the ending is great.",
    )),
    "r_bye": (RECOMMENDER, FOCUS_LAST, (
        "You are welcome, enjoy the movie!",
        "Have fun watching!",
        "Glad I could help. Bye!",
    )),
}
ACT_IDS = {name: i for i, name in enumerate(ACTS)}
PERSON_SLOTS = ("star", "director", "writer")
# _dialogs picks a preference act as s_pref_star + the person's kind (index into PERSON_SLOTS)
if [ACT_IDS[f"s_pref_{k}"] - ACT_IDS["s_pref_star"] for k in PERSON_SLOTS] != [0, 1, 2]:
    raise AssertionError("the s_pref_<kind> acts must follow PERSON_SLOTS' order")

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens, as nltk's word_tokenize splits this controlled English."""
    return _TOKEN_RE.findall(text.lower())


def _tok_fragment(tokens: list[str]) -> str:
    """The inside of a JSON array of the tokens, e.g. '"i", "liked"'."""
    return ", ".join(json.dumps(t) for t in tokens)


def _esc(s: str) -> str:
    """JSON-escaped (no quotes) and str.format-escaped."""
    return json.dumps(s)[1:-1].replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class _Template:
    fmt: str            # a whole utterance JSON object; fields {u} and slot fragments
    has_item: bool
    person: int         # index into PERSON_SLOTS, or -1
    literal_tokens: tuple[str, ...]
    role: str = ""      # Seeker | Recommender


def _compile(raw: str, role: str) -> _Template:
    """Turn a raw template into one str.format string that yields the utterance's JSON."""
    pieces = _SLOT_RE.split(raw)  # literal, slot, literal, slot, ...
    text_parts, raw_parts, entity_parts, word_parts, literal_tokens = [], [], [], [], []
    seen_words: set[str] = set()
    has_item, person = False, -1
    slots_seen: list[str] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                toks = tokenize(piece)
                literal_tokens.extend(toks)
                if toks:
                    text_parts.append(_tok_fragment(toks).replace("{", "{{").replace("}", "}}"))
                raw_parts.append(_esc(piece))
                for t in toks:
                    if t in GENERAL_CONCEPTS and t not in seen_words:
                        seen_words.add(t)
                        word_parts.append(json.dumps(t))
            continue
        slot = piece
        if slot in slots_seen:
            raise AssertionError(f"template repeats slot {slot}: {raw}")
        slots_seen.append(slot)
        if slot == "item":
            has_item = True
            text_parts.append("{it}")
            raw_parts.append("{ir}")
        elif slot == "genre":
            text_parts.append("{gt}")
            raw_parts.append("{gr}")
            entity_parts.append("{gj}")
            word_parts.append("{gw}")
        elif slot == "mood":
            text_parts.append("{mt}")
            raw_parts.append("{mr}")
            word_parts.append("{mw}")
        elif slot in PERSON_SLOTS:
            if person >= 0:
                raise AssertionError(f"template has two person slots: {raw}")
            person = PERSON_SLOTS.index(slot)
            text_parts.append("{pt}")
            raw_parts.append("{pr}")
            entity_parts.append("{pj}")
        else:
            raise AssertionError(f"unknown slot {slot} in {raw}")
    fmt = ('{{"utt_id": {u}, "role": "' + role + '", "text": [' + ", ".join(text_parts)
           + '], "raw_text": "' + "".join(raw_parts) + '", "movies": [' + ("{ij}" if has_item else "")
           + '], "entity": [' + ", ".join(entity_parts) + '], "word": [' + ", ".join(word_parts)
           + "]}}")
    return _Template(fmt, has_item, person, tuple(literal_tokens), role)


def _compile_all() -> tuple[list[_Template], np.ndarray, np.ndarray, np.ndarray]:
    templates: list[_Template] = []
    starts, counts, focus = [], [], []
    for role, foc, raws in ACTS.values():
        starts.append(len(templates))
        counts.append(len(raws))
        focus.append(foc)
        templates.extend(_compile(r, role) for r in raws)
    return templates, np.array(starts), np.array(counts), np.array(focus)


TEMPLATES, _ACT_START, _ACT_COUNT, _ACT_FOCUS = _compile_all()

