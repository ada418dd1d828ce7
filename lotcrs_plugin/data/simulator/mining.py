"""Templates mined from the real training conversations, so that simulated turns read like real
ones: each linked item and entity of a turn is replaced by a slot marker of its kind.

A turn is kept only when every link could be placed in its text and has a known slot kind, no
catalog name is left unlinked in it (an unlinked title would contradict the thread), it is not
about the crowd-sourcing task, preferences and recommendations are not negated, and its role,
slots and position give it an act (see templates.py). Each reason to drop a turn is counted.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.importers.common import STOPWORDS, tokenize
from lotcrs_plugin.data.simulator.templates import BASE_SLOTS, ITEM, Template, parse_template
from lotcrs_plugin.errors import UserError

# Words that are names of something in some catalog yet ordinary in chat: a lowercase single
# word among them is not taken for a leftover name.
COMMON_WORDS = STOPWORDS | frozenset("""
hi hello hey thanks thank yes yeah yep okay ok good great love like liked movie movies film films
watch watched seen see saw really well one time know think would could also much lot fun funny
nice sure bye day night new old little big best better kind something anything family music war
short history sport news game show talk adult reality life home love man woman girl boy friends
friend kids kid children summer christmas today tonight cool awesome enjoy enjoyed maybe
""".split())
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
# Capitalized words that are no names (others in mid-sentence are taken for unlinked names)
_NOT_NAMES = frozenset("""i i'm i've i'll i'd ok okay oh hi hello hey thanks thank yes no lol haha
god omg tv dvd mr mrs ms dr wow yeah yay""".split())
_RAW_MENTION_RE = re.compile(r"@\d+")
_WORD_RE = re.compile(r"\w+(?:[-'.]\w+)*")
_YEAR_TAIL = re.compile(r"\s*\(\d{4}\)$")
_MARK = "\x00"
_SENTENCE_MARKS = frozenset('.!?:;"(')   # marker placeholder while checking leftovers (no word, no name)


def _strip_possessive(word: str) -> str:
    return word[:-2] if word.endswith("'s") and len(word) > 2 else word


def _plural(word: str) -> str:
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


class LeftoverNames:
    """Finds catalog names (items, attributes) in a text; see :meth:`find` for what counts."""

    def __init__(self, catalog: Catalog, proper_nouns: bool = True) -> None:
        self.proper_nouns = proper_nouns
        self.genre_keys: set[tuple[str, ...]] = set()
        keys: set[tuple[str, ...]] = set()
        for name in catalog.item_names:
            for surface in (name, _YEAR_TAIL.sub("", name)):
                keys.add(self._key(surface))
        for a, name in enumerate(catalog.attr_names):
            key = self._key(name)
            keys.add(key)
            if catalog.kinds[int(catalog.attr_kind[a])] == "genre" and key:
                # "comedies" names the genre "comedy" as well
                for k in (key, key[:-1] + (_plural(key[-1]),)):
                    keys.add(k)
                    self.genre_keys.add(k)
        keys.discard(())
        self.keys = keys
        lengths: dict[str, set[int]] = {}
        for k in keys:
            lengths.setdefault(k[0], set()).add(len(k))
        self.lengths = {t: sorted(ls, reverse=True) for t, ls in lengths.items()}

    @staticmethod
    def _key(text: str) -> tuple[str, ...]:
        return tuple(_strip_possessive(w) for w in _WORD_RE.findall(text.lower()))

    def find(self, text: str) -> str | None:
        """The first leftover name in ``text``, or None.

        Any Titlecase word in mid-sentence counts (unless ``proper_nouns`` is off).
        Multi-word names count unless all their words are common and written lowercase
        ("thank you" is no title, "Thank You" mid-sentence is); single words count when
        capitalized other than at a sentence start ("Taken"), or when a genre ("horror").
        """
        words = list(_WORD_RE.finditer(text))
        lows = [_strip_possessive(m.group(0).lower()) for m in words]
        n = len(words)
        # a word starts a sentence when it is the first or follows a sentence mark
        initial = [True] * n
        for i in range(1, n):
            gap = text[words[i - 1].end(): words[i].start()]
            initial[i] = any(c in _SENTENCE_MARKS for c in gap)
        if self.proper_nouns:
            # a Titlecase word in mid-sentence is a name the linker missed (an actor, a title
            # outside the catalog, a streaming service): it would contradict the thread
            for i, m in enumerate(words):
                w = m.group(0)
                if (not initial[i] and w[:1].isupper() and not w.isupper() and len(w) > 1
                        and lows[i] not in _NOT_NAMES):
                    return w
        for i in range(n):
            for length in self.lengths.get(lows[i], ()):
                if i + length > n:
                    continue
                key = tuple(lows[i:i + length])
                if key not in self.keys:
                    continue
                span = words[i:i + length]
                capital = any(m.group(0)[:1].isupper() and not initial[i + j] for j, m in enumerate(span))
                if length == 1:
                    if len(key[0]) < 2:
                        continue
                    if capital or (key in self.genre_keys and key[0] not in COMMON_WORDS):
                        return span[0].group(0)
                elif capital or any(w not in COMMON_WORDS for w in key):
                    return text[span[0].start(): span[-1].end()]
        return None


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


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _surfaces(*names: str) -> tuple[str, ...]:
    return tuple(sorted({" ".join(n.lower().split()) for n in names if n and n.strip()}, key=len, reverse=True))


class TemplateMiner:
    """Mines templates from ``train_data.json`` of a processed dataset folder."""

    def __init__(self, catalog: Catalog, max_tokens: int = 25) -> None:
        self.catalog = catalog
        self.max_tokens = max_tokens
        self.known_slots = tuple(dict.fromkeys(BASE_SLOTS + tuple(catalog.kinds)))
        self.item_index = {n: i for i, n in enumerate(catalog.item_entity_names)}
        self.leftovers = LeftoverNames(catalog)
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
            got = self._surfaces[("a", attr)] = _surfaces(name, ename, name.replace("-", " "))
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
        # overlapping spans: the longer one wins (a title containing a genre word)
        spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        kept: list[tuple[int, int, str]] = []
        for s in spans:
            if kept and s[0] < kept[-1][1]:
                continue
            kept.append(s)
        pieces, masked, last = [], [], 0
        for start, end, kind in kept:
            pieces += [text[last:start], f"[{kind}]"]
            masked += [text[last:start], _MARK]
            last = end
        pieces.append(text[last:])
        masked.append(text[last:])
        template_text = "".join(pieces)
        n_tokens = len(tokenize(SLOT_MARKERS.sub(" x ", template_text)))
        if n_tokens < 2 or n_tokens > self.max_tokens:
            rep["too_short_or_long"] += 1
            return None
        if self.leftovers.find("".join(masked)) is not None:
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


def mine_templates(catalog: Catalog, folder: str | Path, max_tokens: int = 25,
                   max_dialogs: int = 0) -> tuple[list[Template], dict[str, Any]]:
    """Templates mined from ``folder/train_data.json`` (none when it is absent) and a report;
    ``max_dialogs`` > 0 reads only the first that many dialogs (templates stop being new long
    before: a 100k-item catalog's training split would otherwise take minutes and GBs)."""
    path = Path(folder) / "train_data.json"
    if not path.is_file():
        return [], {"train_data": None}
    miner = TemplateMiner(catalog, max_tokens)
    templates = miner.mine(iter_json_list(path, max_dialogs))
    report: dict[str, Any] = {"train_data": str(path), **dict(sorted(miner.report.items()))}
    report["kept_by_act"] = dict(sorted(Counter(
        t.act + (f":{t.kind}" if t.kind else "") for t in templates).items()))
    return templates, report
