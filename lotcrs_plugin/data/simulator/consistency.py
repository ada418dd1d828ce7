"""Does a simulated dialog keep to its own thread? Every genre, person, attribute or title that
one of its turns names must belong to the thread: an attribute of the target item (the
conversation id says which), the target itself, or a related item that the dialog lists and that
shares an attribute with the target. Genres compare by concept (mentions.py), so "scary" agrees
with a target of genre "horror" and contradicts one of genre "drama" only.

    checker = ThreadChecker(Catalog.from_folder(dataset_folder))
    report = checker.check_folder(simulated_folder)   # {"turns", "contradicting_turns", ...}
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.simulator.mentions import STUDIO_WORDS, NameMatcher

_STUDIOS = frozenset(STUDIO_WORDS)
_CONV_ID = re.compile(r"^sim-(\d+)-\d+$")


@dataclass(frozen=True)
class Finding:
    conv_id: str
    turn: int            # index in the dialog
    what: str            # "genre" | "studio" | "name" | "title" | "listed_entity" | "listed_movie"
    surface: str         # the words (or the listed name) that contradict the thread
    raw_text: str


class ThreadChecker:
    """Checks simulated dialogs (the format of train_data.json) against their targets."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.matcher = NameMatcher(catalog)
        self.item_of_eid = {int(e): i for i, e in enumerate(catalog.item_entity_ids.tolist())}
        self.item_of_name = {n: i for i, n in enumerate(catalog.item_entity_names)}
        self.attrs_of_entity: dict[str, set[int]] = {}
        for a, e in enumerate(catalog.attr_entity_names):
            self.attrs_of_entity.setdefault(e if e is not None else catalog.attr_names[a], set()).add(a)
        self._own: dict[int, tuple[frozenset[int], frozenset[str]]] = {}

    def _thread_of(self, item: int) -> tuple[frozenset[int], frozenset[str]]:
        got = self._own.get(item)
        if got is None:
            c = self.catalog
            own = frozenset(c.item_attr_indices[c.item_attr_indptr[item]:c.item_attr_indptr[item + 1]].tolist())
            got = self._own[item] = (own, self.matcher.concepts_of(own))
        return got

    def check(self, dialog: dict) -> list[Finding]:
        """The turns of one simulated dialog that name something outside its thread."""
        conv_id = str(dialog.get("conv_id"))
        m = _CONV_ID.match(conv_id)
        if m is None or int(m.group(1)) not in self.item_of_eid:
            raise ValueError(f"{conv_id!r} is not the id of a simulated dialog of this catalog (sim-<entity id>-<k>)")
        target = self.item_of_eid[int(m.group(1))]
        own, concepts = self._thread_of(target)
        turns = dialog.get("dialog") or []
        out: list[Finding] = []
        allowed_items = {target}
        for k, turn in enumerate(turns):
            for name in turn.get("movies") or []:
                item = self.item_of_name.get(name)
                if item is not None and (item == target or own & self._thread_of(item)[0]):
                    allowed_items.add(item)
                else:
                    out.append(Finding(conv_id, k, "listed_movie", str(name), turn.get("raw_text", "")))
            for name in turn.get("entity") or []:
                if not own & self.attrs_of_entity.get(name, set()):
                    out.append(Finding(conv_id, k, "listed_entity", str(name), turn.get("raw_text", "")))
        for k, turn in enumerate(turns):
            text = turn.get("raw_text") or ""
            # the filled names (checked above) are blanked, so that a literal word next to one
            # is not read with it as another name ("the [item]" filled with "One Piece" is no "The One")
            scan = self._blank_fillers(text, turn)
            for mention in self.matcher.mentions(scan, min_rare=2):
                if (mention.concepts & concepts or allowed_items.intersection(mention.items)
                        or own.intersection(mention.attrs)):
                    continue
                what = (("studio" if mention.concepts <= _STUDIOS else "genre") if mention.concepts
                        else "name" if mention.attrs else "title")
                out.append(Finding(conv_id, k, what, mention.text(text), text))
        return out

    def _blank_fillers(self, text: str, turn: dict) -> str:
        c = self.catalog
        names = {c.item_names[self.item_of_name[m]] for m in turn.get("movies") or [] if m in self.item_of_name}
        for e in turn.get("entity") or []:
            names.update(c.attr_names[a] for a in self.attrs_of_entity.get(e, ()))
        for name in sorted(names, key=len, reverse=True):
            if name and name in text:
                text = text.replace(name, "\x00" * len(name))
        return text

    def check_all(self, dialogs: Iterable[dict], examples: int = 10) -> dict[str, Any]:
        """Counts over many dialogs: turns, contradicting turns and dialogs, findings by kind,
        the most frequent contradicting words and a few examples."""
        n_dialogs = n_turns = 0
        bad_turns = bad_dialogs = 0
        by_what: Counter = Counter()
        words: Counter = Counter()
        shown: list[dict[str, Any]] = []
        for d in dialogs:
            n_dialogs += 1
            n_turns += len(d.get("dialog") or [])
            found = self.check(d)
            if not found:
                continue
            bad_dialogs += 1
            bad_turns += len({f.turn for f in found})
            for f in found:
                by_what[f.what] += 1
                words[f"{f.what}: {f.surface.lower()}"] += 1
                if len(shown) < examples:
                    shown.append({"conv_id": f.conv_id, "turn": f.turn, "what": f.what, "surface": f.surface,
                                  "text": f.raw_text})
        return {"dialogs": n_dialogs, "turns": n_turns, "contradicting_turns": bad_turns,
                "contradicting_dialogs": bad_dialogs, "findings_by_kind": dict(sorted(by_what.items())),
                "top_words": dict(words.most_common(15)), "examples": shown}

    def check_folder(self, folder: str | os.PathLike, examples: int = 10) -> dict[str, Any]:
        """:meth:`check_all` over the simulated_data.json in ``folder``."""
        from lotcrs_plugin.data.simulator.reading import iter_simulated

        return self.check_all(iter_simulated(folder), examples)


__all__ = ["Finding", "ThreadChecker"]
