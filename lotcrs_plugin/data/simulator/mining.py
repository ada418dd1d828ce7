"""Templates mined from the real training conversations, so that simulated turns read like real
ones: each linked item and entity of a turn is replaced by a slot marker of its kind.

A turn is kept only when every link could be placed in its text and has a known slot kind, no
catalog name is left unlinked in it (an unlinked title would contradict the thread), it is not
about the crowd-sourcing task, preferences and recommendations are not negated, and its role,
slots and position give it an act (see templates.py). Each reason to drop a turn is counted.
An unlinked catalog genre name becomes a [genre] slot too, and a turn that speaks of a genre
in other words ("scary", "funny": mentions.py) is dropped: a template keeps no attribute of the
dialog it was mined from, or the simulated dialog it lands in would contradict its own thread.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.importers.common import tokenize
from lotcrs_plugin.data.simulator.mentions import YEAR_TAIL as _YEAR_TAIL
from lotcrs_plugin.data.simulator.mentions import NameMatcher, plural
from lotcrs_plugin.data.simulator.templates import BASE_SLOTS, ITEM, Template, parse_template
from lotcrs_plugin.errors import UserError

# crowd-sourcing chatter of ReDial (the HIT, its forms and its rules) is no template material
_META_RE = re.compile(r"\b(submit|hit|task|form|forms|mturk|turk|bonus|button|click|requirements?|"
                      r"messages?|chat|hide|worker|survey|instructions?|trailers?)\b", re.IGNORECASE)
_NEGATION_RE = re.compile(r"n't\b|\b(not|no|never|nope|cannot|hate|hated|dislike|disliked|boring|"
                          r"worst|bad|awful|terrible)\b", re.IGNORECASE)
# what a turn of each act says somewhere (a turn at the right place that says none of it is
# small talk, not an opening, question, preference, recommendation or goodbye)
_CUES: dict[str, re.Pattern] = {a: re.compile(p, re.IGNORECASE) for a, p in {
    "open": r"\b(hi|hello|hey|morning|afternoon|evening|looking for|recommend\w*|suggest\w*|mood|"
            r"want to (watch|see)|help me|find)\b",
    "ask": r"\b(like|enjoy|prefer|favou?rite|genres?|kind|type|into|mood|looking for|interested|"
           r"watch|seen)\b",
    "prefer": r"\b(like|liked|love|loved|enjoy\w*|favou?rite|great|good|awesome|amazing|fan|into|"
              r"watched|saw|seen|looking for|want|mood|prefer|fun|best|classic|funny)\b",
    "recommend": r"\b(recommend\w*|suggest\w*|try|watch|seen|check|like|love|enjoy|great|good|"
                 r"how about|what about|might|should|also|heard|awesome|classic|fun|funny)\b",
    "close_seeker": r"\b(thanks?|thx|bye|goodbye|good night|have a|check (it|them|those|that) out|"
                    r"will (watch|see|try)|sounds (good|great)|perfect|appreciate\w*|helpful)\b",
    "close_recommender": r"\b(thanks?|bye|goodbye|good night|enjoy|have a|welcome|take care|"
                         r"no problem|glad|hope)\b",
}.items()}
_REQUEST_RE = re.compile(r"\b(looking for|recommend\w*|suggest\w*|mood|want to (watch|see)|help me)\b",
                         re.IGNORECASE)
_CLOSING_RE = re.compile(r"\b(bye|goodbye|good night|thanks?|thank you|thx|have a (good|great|nice))\b",
                         re.IGNORECASE)
_REPLY_RE = re.compile(r"\b(you too|and you|about you|yourself|same here)\b|\byou\b[^.!?]*\b(too|also|as well)\b",
                       re.IGNORECASE)
_ANAPHORA_RE = re.compile(r"\b(that one|this one|those|these|them|either|that movie|this movie|that film|"
                          r"it|it's|the first one|both|which one|he|she|his|her|him|they|their)\b",
                          re.IGNORECASE)
_ACCEPT_RE = re.compile(r"\b(check (it |that |this |them |those )?out|(will|i'll|ill|gonna|going to) "
                        r"(watch|check|try|see|look)|suggest\w*|recommend\w*|you (must|should|might))\b",
                        re.IGNORECASE)
_LEADING_GREETING_RE = re.compile(r"^\W*(hi|hello|hey|howdy|good (morning|afternoon|evening))\b", re.IGNORECASE)
_RAW_MENTION_RE = re.compile(r"@\d+")
_MARK = "\x00"


def _find_spans(text: str, lower: str, surfaces: tuple[str, ...], kind: str) -> list[tuple[int, int, str]]:
    """Whole-word, case-insensitive occurrences of the (lowercase, longest first) surfaces."""
    spans: list[tuple[int, int, str]] = []
    n = len(lower)
    for surface in surfaces:
        start = lower.find(surface)
        while start >= 0:
            end = start + len(surface)
            if ((start == 0 or not _is_word_char(lower[start - 1]))
                    and (end == n or not _is_word_char(lower[end]))
                    and not any(s < end and start < e for s, e, _ in spans)):
                spans.append((start, end, kind))
            start = lower.find(surface, start + 1)
    return spans


def _longest_first(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Non-overlapping spans in text order; of overlapping ones the longer wins (a title
    containing a genre word)."""
    kept: list[tuple[int, int, str]] = []
    for s in sorted(spans, key=lambda s: (s[0], -(s[1] - s[0]))):
        if kept and s[0] < kept[-1][1]:
            continue
        kept.append(s)
    return kept


def _blank(text: str, spans: list[tuple[int, int, str]]) -> str:
    """``text`` with each span overwritten by marks of its length (offsets stay those of text)."""
    if not spans:
        return text
    out, last = [], 0
    for start, end, _ in spans:
        out += [text[last:start], _MARK * (end - start)]
        last = end
    out.append(text[last:])
    return "".join(out)


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _surfaces(*names: str) -> tuple[str, ...]:
    return tuple(sorted({" ".join(n.lower().split()) for n in names if n and n.strip()}, key=len, reverse=True))


class TemplateMiner:
    """Mines templates from ``train_data.json`` of a processed dataset folder."""

    def __init__(self, catalog: Catalog, max_tokens: int = 25, matcher: NameMatcher | None = None) -> None:
        self.catalog = catalog
        self.max_tokens = max_tokens
        self.known_slots = tuple(dict.fromkeys(BASE_SLOTS + tuple(catalog.kinds)))
        self.item_index = {n: i for i, n in enumerate(catalog.item_entity_names)}
        self.matcher = matcher if matcher is not None else NameMatcher(catalog)
        self.genre_slot = "genre" if "genre" in catalog.kinds else None
        self._surfaces: dict[tuple[str, int], tuple[str, ...]] = {}
        self.report: Counter = Counter()

    def _item_surfaces(self, item: int) -> tuple[str, ...]:
        got = self._surfaces.get(("i", item))
        if got is None:
            name = self.catalog.item_names[item]
            got = self._surfaces[("i", item)] = _surfaces(name, _YEAR_TAIL.sub("", name))
        return got

    def _attr_surfaces(self, attr: int) -> tuple[str, ...]:
        got = self._surfaces.get(("a", attr))
        if got is None:
            name = self.catalog.attr_names[attr]
            ename = self.catalog.attr_entity_names[attr] or name
            names = [name, ename, name.replace("-", " ")]
            if self.catalog.kinds[int(self.catalog.attr_kind[attr])] == "genre":
                names += [plural(n) for n in names[::2]]   # "thrillers" for the linked "thriller"
            got = self._surfaces[("a", attr)] = _surfaces(*names)
        return got

    def mine_turn(self, turn: dict, position: int, n_turns: int) -> Template | None:
        """The template of one turn, or None (the reason is counted in ``report``)."""
        rep = self.report
        text = turn.get("raw_text")
        role = turn.get("role")
        if not isinstance(text, str) or role not in ("Seeker", "Recommender"):
            rep["malformed_turn"] += 1
            return None
        text = " ".join(html.unescape(text).split())   # ReDial has &quot; and &amp; in its texts
        if "[" in text or "]" in text or _MARK in text:
            rep["has_brackets"] += 1
            return None
        if _RAW_MENTION_RE.search(text):
            rep["raw_item_mention"] += 1
            return None
        if _META_RE.search(text):
            rep["about_the_task"] += 1
            return None
        spans: list[tuple[int, int, str]] = []
        lower = text.lower()
        if len(lower) != len(text):   # offsets in the lowercase text must be those of the text
            rep["malformed_turn"] += 1
            return None
        for name in turn.get("movies") or []:
            item = self.item_index.get(name)
            if item is None:
                rep["unknown_item"] += 1
                return None
            found = _find_spans(text, lower, self._item_surfaces(item), ITEM)
            if not found:
                rep["item_not_in_text"] += 1
                return None
            spans += found
        for name in turn.get("entity") or []:
            if name in self.item_index:
                item = self.item_index[name]
                found = _find_spans(text, lower, self._item_surfaces(item), ITEM)
            else:
                attr = self.catalog.entity_attribute.get(name)
                if attr is None:
                    rep["entity_of_unknown_kind"] += 1
                    return None
                kind = self.catalog.kinds[int(self.catalog.attr_kind[attr])]
                found = _find_spans(text, lower, self._attr_surfaces(attr), kind)
            if not found:
                rep["entity_not_in_text"] += 1
                return None
            spans += found
        kept = _longest_first(spans)
        # what the linker missed: a catalog genre name becomes a slot; a genre (or studio) said
        # in other words, a title or a person's name drops the turn
        blanked = _blank(text, kept)
        extra: list[tuple[int, int, str]] = []
        capitals: list[tuple[int, int]] = []
        for m in self.matcher.mentions(blanked, capitals=capitals):
            if (m.genre_attr and not m.items and self.genre_slot is not None
                    and all(a in self.matcher.attr_concepts for a in m.attrs)):
                extra.append((m.start, m.end, self.genre_slot))
            elif m.concepts and not m.items and not m.attrs:
                rep["attribute_word"] += 1
                return None
            else:
                rep["leftover_name"] += 1
                return None
        if extra:
            kept = _longest_first(kept + extra)
        pieces, last = [], 0
        for start, end, kind in kept:
            pieces += [text[last:start], f"[{kind}]"]
            last = end
        pieces.append(text[last:])
        template_text = "".join(pieces)
        n_tokens = len(tokenize(SLOT_MARKERS.sub(" x ", template_text)))
        if n_tokens < 2 or n_tokens > self.max_tokens:
            rep["too_short_or_long"] += 1
            return None
        # a Titlecase word in mid-sentence is a name the linker missed (an actor, a title outside
        # the catalog, a streaming service): it would contradict the thread
        if any(not any(s <= a and b <= e for s, e, _ in extra) for a, b in capitals):
            rep["leftover_name"] += 1
            return None
        slots = [k for _, _, k in kept]
        n_items = slots.count(ITEM)
        act = None
        if role == "Seeker":
            if not slots:
                if position == 0 or (position == 1 and _REQUEST_RE.search(text)):
                    act = "open"
                elif position >= n_turns - 3:
                    act = "close_seeker"
            elif len(slots) == 1 and "?" not in text:
                act = "prefer"
        else:
            if not slots:
                act = "close_recommender" if position >= n_turns - 2 else ("ask" if "?" in text else None)
            elif n_items == 1 and len(slots) <= 2:
                act = "recommend"
        if act is None:
            rep["no_act"] += 1
            return None
        if act in ("prefer", "recommend", "close_seeker") and _NEGATION_RE.search(template_text):
            rep["negated"] += 1
            return None
        if act.startswith("close") and "?" in text:
            rep["no_act"] += 1
            return None
        if not _CUES[act].search(template_text):
            rep["off_topic"] += 1
            return None
        if not act.startswith("close") and _CLOSING_RE.search(template_text):
            rep["says_goodbye"] += 1   # a goodbye in mid-conversation
            return None
        if act in ("open", "close_seeker", "close_recommender") and _REPLY_RE.search(template_text):
            rep["refers_back"] += 1    # answers a wish the simulated dialog does not have
            return None
        if act in ("open", "ask") and _ANAPHORA_RE.search(template_text):
            rep["refers_back"] += 1    # "Have you seen that one?": about a movie never named
            return None
        if act == "prefer" and _ACCEPT_RE.search(template_text):
            rep["refers_back"] += 1    # accepts a suggestion instead of stating a taste
            return None
        if act in ("prefer", "recommend") and _LEADING_GREETING_RE.search(template_text):
            rep["refers_back"] += 1    # a greeting in mid-conversation
            return None
        try:
            return parse_template(template_text, act, self.known_slots, "mined", "mined template")
        except UserError:
            rep["no_act"] += 1
            return None

    def mine(self, dialogs: Iterable[dict]) -> list[Template]:
        """Unique templates of ``dialogs``, in order of first appearance."""
        out: dict[tuple[str, str | None, str], Template] = {}
        for dialog in dialogs:
            turns = dialog.get("dialog") if isinstance(dialog, dict) else None
            if not isinstance(turns, list):
                self.report["malformed_dialog"] += 1
                continue
            for position, turn in enumerate(turns):
                self.report["turns"] += 1
                t = self.mine_turn(turn, position, len(turns)) if isinstance(turn, dict) else None
                if t is None:
                    continue
                key = (t.act, t.kind, t.text)
                if key in out:
                    self.report["duplicate"] += 1
                else:
                    out[key] = t
        self.report["kept"] = len(out)
        return list(out.values())


SLOT_MARKERS = re.compile(r"\[[^\[\]]*\]")


def iter_json_list(path: Path, limit: int = 0, chunk: int = 1 << 20) -> Iterator[Any]:
    """The elements of a JSON list file, parsed one by one from a stream (a large file is never
    held whole), the first ``limit`` only when limit > 0. UserError names the file and line of
    malformed JSON or of a file that is not a list."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, lines_before, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, pos, lines_before, eof
            if eof:
                return False
            lines_before += buf.count("\n", 0, pos)
            part = f.read(chunk)
            buf, pos, eof = buf[pos:] + part, 0, not part
            return bool(part)

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        def fail(msg: str, at: int | None = None) -> UserError:
            line = lines_before + buf.count("\n", 0, pos if at is None else at)
            return UserError(f"{path}:{line}: {msg}")

        if skip_space() != "[":
            raise fail("expected a JSON list of dialogs {conv_id, dialog: [turn, ...]}")
        pos += 1
        n = 0
        while True:
            c = skip_space()
            if c == "]":
                return
            if n:
                if c != ",":
                    raise fail("malformed JSON in the training dialogs (expected ',' or ']')")
                pos += 1
                skip_space()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if more():  # an element cut by the end of the chunk
                        continue
                    raise fail(f"malformed JSON in the training dialogs ({e.msg})", e.pos) from None
                if end < len(buf) or eof or not more():  # a number at the very end may go on
                    break
            pos = end
            yield obj
            n += 1
            if limit and n >= limit:
                return


def mine_templates(catalog: Catalog, folder: str | Path, max_tokens: int = 25, max_dialogs: int = 0,
                   matcher: NameMatcher | None = None) -> tuple[list[Template], dict[str, Any]]:
    """Templates mined from ``folder/train_data.json`` (none when it is absent) and a report;
    ``max_dialogs`` > 0 reads only the first that many dialogs (templates stop being new long
    before: a 100k-item catalog's training split would otherwise take minutes and GBs).
    ``matcher``: the catalog's NameMatcher, when the caller has one already."""
    path = Path(folder) / "train_data.json"
    if not path.is_file():
        return [], {"train_data": None}
    miner = TemplateMiner(catalog, max_tokens, matcher)
    templates = miner.mine(iter_json_list(path, max_dialogs))
    report: dict[str, Any] = {"train_data": str(path), **dict(sorted(miner.report.items()))}
    report["kept_by_act"] = dict(sorted(Counter(
        t.act + (f":{t.kind}" if t.kind else "") for t in templates).items()))
    return templates, report
