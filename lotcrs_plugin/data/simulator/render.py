"""Fast string assembly of simulated turns: every template and every filler (item or attribute)
is turned into ready JSON fragments once, so that a turn is one ``%`` format of a few strings.

A turn is written as the processed layout's turn object (docs/DATA_LAYOUT.md), compact JSON:
{"utt_id","role","text","raw_text","movies","entity","word"}. Its tokens are the importer's
tokenizer applied to the template with slot placeholders, with the fillers' tokens put in; its
concept words are the tokens found in word2id.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.importers.common import tokenize
from lotcrs_plugin.data.simulator.templates import ITEM, SLOT_RE, Template
from lotcrs_plugin.errors import UserError

_PLACEHOLDER = "xxslot{}xx"


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _q(s: str) -> str:
    """JSON string literal of ``s`` (as json.dumps with ensure_ascii=False, faster)."""
    return json.dumps(s, ensure_ascii=False) if _NEEDS_ESCAPE.search(s) else f'"{s}"'


def _b(s: str) -> bytes:
    return s.encode("utf-8")


def _tok_frag(tokens: list[str]) -> str:
    return ",".join(_q(t) for t in tokens)


def _words_frag(tokens: list[str], word2id: dict[str, int]) -> str:
    """Comma-prefixed JSON strings of the concept words among ``tokens`` (each once)."""
    return "".join("," + _q(t) for t in dict.fromkeys(tokens) if t in word2id)


_SEP = "\x01"


def tokenize_many(texts: list[str]) -> list[list[str]]:
    """``tokenize`` of each text, in one regex pass over the joined texts (a separator symbol
    that no text contains keeps them apart; each text is its own sentence either way)."""
    if not texts:
        return []
    if any(_SEP in t for t in texts):
        return [tokenize(t) for t in texts]
    out: list[list[str]] = [[]]
    for tok in tokenize(f" {_SEP} ".join(texts)):
        if tok == _SEP:
            out.append([])
        else:
            out[-1].append(tok)
    if len(out) != len(texts):   # cannot happen with a one-symbol separator; stay safe
        return [tokenize(t) for t in texts]
    return out


@dataclass
class Fillers:
    """UTF-8 JSON fragments of every filler id f (items 0..n_items-1, then attributes)."""

    tok: list[bytes]    # '"tok","tok"' (never empty)
    raw: list[bytes]    # the display name, JSON-escaped, no quotes
    name: list[bytes]   # '"entity name"' or '' (an attribute without an entity)
    words: list[bytes]  # ',"word",...' or ''
    tokens: list[list[str]]

    @classmethod
    def build(cls, catalog: Catalog, word2id: dict[str, int]) -> "Fillers":
        names = catalog.item_names + catalog.attr_names
        entities = catalog.item_entity_names + catalog.attr_entity_names
        tokens = [t if t else [n.lower() or "__unk__"] for n, t in zip(names, tokenize_many(names))]
        tok = [_b(_tok_frag(t)) for t in tokens]
        raw = [_b(_q(n)[1:-1]) for n in names]
        name = [_b(_q(e)) if e is not None else b"" for e in entities]
        words = [_b(_words_frag(t, word2id)) for t in tokens]
        return cls(tok=tok, raw=raw, name=name, words=words, tokens=tokens)


@dataclass
class Compiled:
    """One template ready for assembly (see :func:`render_turns`)."""

    arity: int
    fmt: bytes          # %-format of the turn after '{"utt_id":N,'; arity 0: the finished text
    words: tuple[bytes, ...]  # comma-prefixed concept words of the literal pieces, len = arity + 1
    item_first: bool    # arity 2: the [item] slot comes before the reason slot
    tokens: list[str]   # literal tokens (for vocabulary accounting)


def compile_template(t: Template, word2id: dict[str, int]) -> Compiled:
    """JSON fragments of ``t``; UserError if a slot is glued to a word (``[item]s``)."""
    pieces = SLOT_RE.split(t.text)
    literals = pieces[0::2]
    arity = len(t.slots)
    probe = "".join(lit + (f" {_PLACEHOLDER.format(i)} " if i < arity else "")
                    for i, lit in enumerate(literals))
    toks = tokenize(probe)
    groups: list[list[str]] = [[]]
    seen = 0
    for tok in toks:
        if tok == _PLACEHOLDER.format(seen) and seen < arity:
            groups.append([])
            seen += 1
        elif "xxslot" in tok:
            raise UserError(f"template {t.text!r}: a slot is glued to a word; put spaces or "
                            f"punctuation around [{t.slots[min(seen, arity - 1)]}]")
        else:
            groups[-1].append(tok)
    if seen != arity:
        raise UserError(f"template {t.text!r}: could not place its slots in its tokens")
    role = t.role
    lit_tok = [_tok_frag(g) for g in groups]
    # literal words, each once per template, placed where they occur
    taken: set[str] = set()
    words = []
    for g in groups:
        frag = []
        for w in g:
            if w in word2id and w not in taken:
                taken.add(w)
                frag.append("," + _q(w))
        words.append("".join(frag))
    if arity == 0:
        fmt = (f'"role":"{role}","text":[{lit_tok[0]}],"raw_text":{_q(literals[0])},'
               f'"movies":[],"entity":[],"word":[{words[0][1:]}]}}')
        return Compiled(0, _b(fmt), tuple(_b(w) for w in words), True, groups[0])
    text_parts = []
    for i in range(arity + 1):
        if lit_tok[i]:
            text_parts.append(lit_tok[i].replace("%", "%%"))
        if i < arity:
            text_parts.append("%s")
    raw = "".join(_q(lit)[1:-1].replace("%", "%%") + ("%s" if i < arity else "")
                  for i, lit in enumerate(literals))
    if arity == 1:
        lists = '"movies":[%s],"entity":[]' if t.slots[0] == ITEM else '"movies":[],"entity":[%s]'
        item_first = True
    else:
        lists = '"movies":[%s],"entity":[%s]'
        item_first = t.slots[0] == ITEM
    fmt = (f'"role":"{role}","text":[' + ",".join(text_parts) + '],"raw_text":"' + raw + '",'
           + lists + ',"word":[%s]}')
    return Compiled(arity, _b(fmt), tuple(_b(w) for w in words), item_first, [w for g in groups for w in g])


def render_turns(out: list[bytes], compiled: list[Compiled], fillers: Fillers, tpl: list[int],
                 f0: list[int], f1: list[int], utt: list[int], first: list[bool], heads: list[bytes]) -> None:
    """Append the UTF-8 JSON of turns to ``out``: a conversation's head before its first turn,
    ',' between turns. ``f0`` is the filler of a one-slot template and the [item] of a
    two-slot one, ``f1`` the reason filler of a two-slot one."""
    TOK, RAW, NAME, WC = fillers.tok, fillers.raw, fillers.name, fillers.words
    AR = [c.arity for c in compiled]
    FMT = [c.fmt for c in compiled]
    W = [c.words for c in compiled]
    IF = [c.item_first for c in compiled]
    U = [b'{"utt_id":%d,' % i for i in range(max(utt, default=0) + 1)]
    app = out.append
    h = 0
    for k in range(len(tpl)):
        ti = tpl[k]
        if first[k]:
            app(heads[h])
            h += 1
        else:
            app(b",")
        app(U[utt[k]])
        a = AR[ti]
        if a == 0:
            app(FMT[ti])
        elif a == 1:
            f = f0[k]
            w = W[ti]
            app(FMT[ti] % (TOK[f], RAW[f], NAME[f], (w[0] + WC[f] + w[1])[1:]))
        else:
            f, g = f0[k], f1[k]
            x, y = (f, g) if IF[ti] else (g, f)
            w = W[ti]
            app(FMT[ti] % (TOK[x], TOK[y], RAW[x], RAW[y], NAME[f], NAME[g],
                           (w[0] + WC[x] + w[1] + WC[y] + w[2])[1:]))
