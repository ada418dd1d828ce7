"""Turn templates: what each act of a simulated conversation may say, with [slot] markers.

A conversation is: Seeker ``open``; for each thread element an ``ask`` (Recommender) and a
``prefer`` (Seeker, one slot of the element's kind); the ``recommend`` (Recommender: one [item],
the target, and at most one attribute slot, the reason); ``close_seeker``; ``close_recommender``.
Templates come from the built-in set below, from a user file ({act: [text, ...]}, acts as in
:data:`ACTS`, ``ask:<kind>`` for a question about one kind), and from mining (mining.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lotcrs_plugin.data.catalog import CANONICAL_KINDS
from lotcrs_plugin.errors import UserError

ACTS: dict[str, str] = {          # act -> role
    "open": "Seeker",
    "ask": "Recommender",
    "prefer": "Seeker",
    "recommend": "Recommender",
    "close_seeker": "Seeker",
    "close_recommender": "Recommender",
}
ITEM = "item"
BASE_SLOTS: tuple[str, ...] = (ITEM,) + CANONICAL_KINDS
SLOT_RE = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class Template:
    act: str                      # a key of ACTS
    kind: str | None              # ask: the kind asked about (None: any); prefer: the slot's kind;
                                  # recommend: the reason's kind (None: no reason)
    text: str                     # with [slot] markers
    slots: tuple[str, ...]        # slot kinds in text order
    source: str                   # "builtin" | "file" | "mined"

    @property
    def role(self) -> str:
        return ACTS[self.act]


def parse_template(text: str, act_key: str, known_slots: tuple[str, ...] | list[str],
                   source: str, where: str) -> Template:
    """Check one template and say which act and kind it serves; UserError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: a template must be a non-empty string, not {text!r}")
    text = " ".join(text.split())
    act, _, ask_kind = act_key.partition(":")
    if act not in ACTS or (ask_kind and act != "ask"):
        raise UserError(f"{where}: unknown act '{act_key}'; known acts: {', '.join(ACTS)}, ask:<kind>")
    if ask_kind and ask_kind not in known_slots:
        raise UserError(f"{where}: unknown kind '{ask_kind}' in act '{act_key}'; known kinds: "
                        f"{', '.join(known_slots)}")
    slots = tuple(SLOT_RE.findall(text))
    for s in slots:
        if s not in known_slots:
            raise UserError(f"{where}: unknown slot [{s}] in template {text!r}; known slots: "
                            f"{', '.join('[' + k + ']' for k in known_slots)}")
    if "[" in SLOT_RE.sub("", text) or "]" in SLOT_RE.sub("", text):
        raise UserError(f"{where}: unbalanced '[' or ']' in template {text!r}; write slots as [kind]")
    if act in ("open", "ask", "close_seeker", "close_recommender"):
        if slots:
            raise UserError(f"{where}: a '{act}' template takes no slot, but {text!r} has "
                            f"{', '.join('[' + s + ']' for s in slots)}")
        kind = ask_kind or None
    elif act == "prefer":
        if len(slots) != 1:
            raise UserError(f"{where}: a 'prefer' template takes exactly one slot (the element the "
                            f"seeker likes), but {text!r} has {len(slots)}")
        kind = slots[0]
    else:  # recommend
        others = [s for s in slots if s != ITEM]
        if slots.count(ITEM) != 1 or len(others) > 1:
            raise UserError(f"{where}: a 'recommend' template takes one [item] (the target) and at most "
                            f"one other slot (the reason), but {text!r} has {', '.join(slots) or 'none'}")
        kind = others[0] if others else None
    return Template(act=act, kind=kind, text=text, slots=slots, source=source)


def parse_set(sets: dict[str, list[str]], known_slots, source: str, where: str) -> list[Template]:
    return [parse_template(text, act, known_slots, source, f"{where}: act '{act}' entry {i + 1}")
            for act, texts in sets.items() for i, text in enumerate(texts)]


def load_template_file(path: str | Path, known_slots) -> list[Template]:
    """Templates of a YAML (or JSON) file ``{act: [text, ...]}``; errors name the file and line."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"templates file not found: {p} (simulation key 'templates')")
    try:
        root = yaml.compose(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}{line}: not valid YAML/JSON ({getattr(err, 'problem', None) or err})") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{p}:{root.start_mark.line + 1}: expected a mapping {{act: [template, ...]}}")
    out: list[Template] = []
    for key_node, value_node in root.value:
        act = key_node.value
        if not isinstance(value_node, yaml.SequenceNode):
            raise UserError(f"{p}:{value_node.start_mark.line + 1}: act '{act}' must map to a list of templates")
        for item in value_node.value:
            where = f"{p}:{item.start_mark.line + 1}"
            if not isinstance(item, yaml.ScalarNode):
                raise UserError(f"{where}: a template must be a string")
            out.append(parse_template(item.value, str(act), known_slots, "file", where))
    return out


# The built-in set (LOT-CRS's examples among them). English, movie domain.
BUILTIN: dict[str, list[str]] = {
    "open": [
        "Hi! I'm looking for a movie to watch.",
        "Hello, can you recommend a good movie?",
        "Hi there. I need a movie recommendation.",
        "Hey! What should I watch tonight?",
        "Hi, I'd like to find a new movie.",
        "Hello! I'm in the mood for a good film.",
        "Hi, could you suggest a movie for me?",
    ],
    "ask": [
        "What kind of movies do you like?",
        "You should tell me what kind of movies you like?",
        "Sure! What do you usually enjoy watching?",
        "Tell me about some movies you liked.",
        "What else do you like?",
        "Anything else you enjoy?",
        "Can you tell me more about your taste?",
    ],
    "ask:genre": [
        "What genre are you in the mood for?",
        "Which kind of movies do you like the most?",
        "Do you have a favorite genre?",
    ],
    "ask:star": [
        "Do you have a favorite actor?",
        "Who is your favorite actor or actress?",
        "Is there an actor you really like?",
    ],
    "ask:director": [
        "Is there a director you like?",
        "Do you have any favorite directors?",
    ],
    "ask:writer": [
        "Any writers whose stories you enjoy?",
    ],
    "ask:item": [
        "What is a movie you liked recently?",
        "Which movies have you enjoyed lately?",
        "What was the last movie you really liked?",
    ],
    "prefer": [
        "I love to watch [genre] movies.",
        "I'm really into [genre] films.",
        "I like a good [genre] movie.",
        "Something [genre] would be great.",
        "I'm in the mood for [genre].",
        "I recently watched [item].",
        "I really liked [item].",
        "[item] is one of my favorites.",
        "I loved [item]!",
        "I enjoyed [item] a lot.",
        "The films of [star] always surprise me.",
        "I like movies with [star].",
        "[star] is my favorite actor.",
        "Anything with [star] in it would be nice.",
        "I like movies directed by [director].",
        "[director] is a great director.",
        "I enjoy the films of [director].",
        "I like stories written by [writer].",
        "[writer] writes great movies.",
        "I like the movies [producer] produces.",
        "The music of [composer] is wonderful.",
    ],
    "recommend": [
        "You should watch [item].",
        "I think you would like [item].",
        "Have you seen [item]? You might enjoy it.",
        "[item] is great.",
        "I would recommend [item].",
        "[item] is a great [genre] movie.",
        "If you like [genre], try [item].",
        "You should watch [item], it is a fun [genre] film.",
        "[item] is great. [star] is in the movie.",
        "You might like [item], it stars [star].",
        "Try [item] with [star].",
        "[item] is directed by [director]. You should watch it.",
        "I recommend [item] by [director].",
        "[item] was written by [writer]. I think you would like it.",
        "[item] was produced by [producer]. You might like it.",
        "[item] has music by [composer]. You should watch it.",
    ],
    "close_seeker": [
        "Thanks, I will check it out!",
        "That sounds great, thank you!",
        "Thanks for the suggestion.",
        "Great, I'll watch it tonight.",
        "Sounds good, thanks!",
    ],
    "close_recommender": [
        "You're welcome! Enjoy the movie.",
        "Enjoy!",
        "Have a nice day!",
        "Glad I could help. Bye!",
        "No problem, have fun watching.",
    ],
}


def builtin_templates() -> list[Template]:
    return parse_set(BUILTIN, BASE_SLOTS, "builtin", "built-in templates")


__all__ = ["ACTS", "BASE_SLOTS", "BUILTIN", "ITEM", "SLOT_RE", "Template", "builtin_templates",
           "load_template_file", "parse_set", "parse_template"]
