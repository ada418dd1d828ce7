"""Which catalog items and attributes a text names, and which genres it speaks of.

One matcher serves both sides of the simulator: mining (a mined template may keep no name or
genre word of the dialog it came from) and the thread check (consistency.py: a simulated turn
may name only what belongs to its own thread). A mention is a run of words that is a catalog
title, an attribute's display name, or a genre word: a catalog genre's name (and its plural), or
a word of :data:`GENRE_WORDS` that says a genre without naming it ("scary", "funny", "rom-com").
Genres are compared by concept: a catalog genre stands for its own name and for every concept
whose words it contains ("supernatural horror" is horror, "comedy-drama" comedy and drama).
Studio words ("disney movies") are concepts too, of the attributes whose names hold them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lotcrs_plugin.data.catalog import Catalog
from lotcrs_plugin.data.importers.common import STOPWORDS

# Words that are names of something in some catalog yet ordinary in chat: a lowercase single
# word among them is not taken for a leftover name.
COMMON_WORDS = STOPWORDS | frozenset("""
hi hello hey thanks thank yes yeah yep okay ok good great love like liked movie movies film films
watch watched seen see saw really well one time know think would could also much lot fun funny
nice sure bye day night new old little big best better kind something anything family music war
short history sport news game show talk adult reality life home love man woman girl boy friends
friend kids kid children summer christmas today tonight cool awesome enjoy enjoyed maybe
""".split())

# concept -> the words (phrases, comma-separated) that say it in chat. Adjectives and slang are
# here because a template that keeps them ("what kind of scary movies ...") says a genre that
# its simulated dialog may not have; the concept names follow ReDial's genre names.
GENRE_WORDS: dict[str, str] = {
    "action": "action, action-packed",
    "adventure": "adventure, adventures, adventurous",
    "animation": "animation, animations, animated, cartoon, cartoons, anime",
    "biography": "biography, biographies, biographical, biopic, biopics",
    "comedy": "comedy, comedies, comedys, comedic, funny, funnier, funniest, hilarious, humor, humour, "
              "humorous, rom-com, rom-coms, romcom, romcoms, sitcom, sitcoms, satire, spoof, spoofs, "
              "parody, parodies, slapstick, mockumentary",
    "crime": "crime, gangster, gangsters, mafia, mob, heist, heists",
    "documentary": "documentary, documentaries, docudrama",
    "drama": "drama, dramas, dramatic, tearjerker, tearjerkers, tragedy, docudrama",
    "family": "family, family-friendly, kids, kid, children",
    "fantasy": "fantasy, fantasies",
    "film-noir": "noir, film noir, film-noir",
    "history": "history, historical, period piece, period pieces",
    "horror": "horror, horrors, scary, scarier, scariest, creepy, spooky, frightening, terrifying, "
              "slasher, slashers, gore, gory",
    "music": "music",
    "musical": "musical, musicals",
    "mystery": "mystery, mysteries, whodunit, whodunits",
    "romance": "romance, romances, romantic, rom-com, rom-coms, romcom, romcoms, chick flick, "
               "chick flicks, love story, love stories",
    "sci-fi": "sci-fi, sci fi, scifi, science fiction, science-fiction",
    "sport": "sport, sports",
    "superhero": "superhero, superheroes, super hero, super heroes",
    "thriller": "thriller, thrillers, suspense, suspenseful, thrilling",
    "war": "war",
    "western": "western, westerns",
}
# Studios and franchises that chat names like genres ("any disney movies?"): they agree with a
# target that has an attribute of that name (INSPIRED's companies), and with no other.
STUDIO_WORDS: tuple[str, ...] = ("disney", "pixar", "marvel", "dreamworks", "ghibli")
# Genre words that are ordinary words too ("my kids", "the music was great"): they say a genre
# only right before a film noun ("kids movies", "war films").
AMBIGUOUS_GENRE_WORDS = frozenset("""family kids kid children history music war sport sports short
news adult reality game talk show mob period""".split())
FILM_NOUNS = frozenset("movie movies film films flick flicks genre genres one ones".split())
# Capitalized words that are no names (others in mid-sentence are taken for unlinked names)
NOT_NAMES = frozenset("""i i'm i've i'll i'd ok okay oh hi hello hey thanks thank yes no lol haha
god omg tv dvd mr mrs ms dr wow yeah yay""".split())

WORD_RE = re.compile(r"\w+(?:[-'.]\w+)*")
YEAR_TAIL = re.compile(r"\s*\(\d{4}\)$")
_SENTENCE_MARKS = frozenset('.!?:;"(')   # a word after one of these starts a sentence
_SPLIT = re.compile(r"[\s\-]+")
_SLOT = re.compile(r"\[[^\[\]]*\]")


def strip_possessive(word: str) -> str:
    return word[:-2] if word.endswith("'s") and len(word) > 2 else word


def plural(word: str) -> str:
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def name_key(text: str) -> tuple[str, ...]:
    """The words of a name as the matcher compares them (lowercase, no possessive 's)."""
    return tuple(strip_possessive(w) for w in WORD_RE.findall(text.lower()))


def _phrases(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def _sub_concepts(name: str) -> set[str]:
    """Concepts of GENRE_WORDS whose words occur in a genre name ("black comedy" -> comedy)."""
    words = [w for w in _SPLIT.split(name.lower()) if w]
    found = set()
    for concept, spec in GENRE_WORDS.items():
        for phrase in _phrases(spec) + [concept]:
            p = [w for w in _SPLIT.split(phrase) if w]
            if p and any(words[i:i + len(p)] == p for i in range(len(words) - len(p) + 1)):
                found.add(concept)
                break
    return found


@dataclass(frozen=True)
class Mention:
    start: int                  # character offsets in the text
    end: int
    items: tuple[int, ...]      # catalog items with this name
    attrs: tuple[int, ...]      # catalog attributes with this name
    concepts: frozenset[str]    # genre (or studio) concepts it says (empty: none)
    genre_attr: bool            # the words are a catalog genre's name (a [genre] slot can stand there)

    def text(self, source: str) -> str:
        return source[self.start:self.end]


class NameMatcher:
    """Finds the mentions of catalog names and genre words in a text (see :meth:`mentions`)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        genre = catalog.kinds.index("genre") if "genre" in catalog.kinds else -1
        items: dict[tuple[str, ...], list[int]] = {}       # key -> items with that name
        attrs: dict[tuple[str, ...], list[int]] = {}       # key -> attributes with that name
        concepts: dict[tuple[str, ...], set[str]] = {}     # key -> genre concepts it says
        genre_keys: set[tuple[str, ...]] = set()           # keys that are a catalog genre's name
        for i, name in enumerate(catalog.item_names):
            items.setdefault(name_key(name), []).append(i)
            bare = YEAR_TAIL.sub("", name)
            if bare != name:
                items.setdefault(name_key(bare), []).append(i)
        self.attr_concepts: dict[int, frozenset[str]] = {}
        for a, name in enumerate(catalog.attr_names):
            if int(catalog.attr_kind[a]) != genre:
                attrs.setdefault(name_key(name), []).append(a)
                if "-" in name:
                    attrs.setdefault(name_key(name.replace("-", " ")), []).append(a)
                low = name.lower()
                studios = [w for w in STUDIO_WORDS if w in low and w in name_key(low)]
                if studios:
                    self.attr_concepts[a] = frozenset(studios)
                continue
            own = self.attr_concepts[a] = frozenset({" ".join(_SPLIT.split(name.lower()))} | _sub_concepts(name))
            surfaces = {name, name.replace("-", " ")}
            # "comedies" (and the "comedys" of chat) name the genre "comedy" as well
            for s in surfaces | {plural(s) for s in surfaces} | {s + "s" for s in surfaces}:
                key = name_key(s)
                attrs.setdefault(key, []).append(a)
                concepts.setdefault(key, set()).update(own)
                genre_keys.add(key)
        for concept, spec in GENRE_WORDS.items():
            for phrase in _phrases(spec):
                for s in {phrase, phrase.replace("-", " ")}:
                    concepts.setdefault(name_key(s), set()).add(concept)
        for w in STUDIO_WORDS:
            concepts.setdefault((w,), set()).add(w)
        for d in (items, attrs, concepts):
            d.pop((), None)
        self._items, self._attrs, self._genre_keys = items, attrs, genre_keys
        self._concepts = {k: frozenset(v) for k, v in concepts.items()}
        # candidate lengths by the first two words (by the first alone, most words start nothing;
        # "the" starts a thousand titles)
        lengths: dict[tuple[str, ...], set[int]] = {}
        for d in (items, attrs, concepts):
            for k in d:
                if len(k) > 1:
                    lengths.setdefault(k[:2], set()).add(len(k))
        self._starts = frozenset(k[0] for d in (items, attrs, concepts) for k in d)
        self._lengths = {t: tuple(sorted(ls, reverse=True)) for t, ls in lengths.items()}

    def concepts_of(self, attrs) -> frozenset[str]:
        """The concepts (genres, studios) that the given attributes (any kinds) stand for."""
        out: set[str] = set()
        for a in attrs:
            out |= self.attr_concepts.get(int(a), frozenset())
        return frozenset(out)

    def mentions(self, text: str, min_rare: int = 1,
                 capitals: list[tuple[int, int]] | None = None) -> list[Mention]:
        """The mentions in ``text``, left to right, longest first, not overlapping.

        Genre words count wherever they stand, except the ambiguous ones
        (:data:`AMBIGUOUS_GENRE_WORDS`), which count before a film noun. A name of one word
        counts when capitalized other than at a sentence start ("Taken"); a longer one unless
        all its words are common and written lowercase ("thank you" is no title, "Thank You"
        in mid-sentence is). ``min_rare``: how many uncommon words a lowercase name of several
        words needs (1 for mining, where a false alarm only drops a template; 2 for judging a
        text, where "anything else" must not count as the title "Anything Else").
        ``capitals``: if given, receives the spans of all Titlecase words in mid-sentence,
        names or not (mining takes them for names that the linker missed).
        """
        low = text.lower()
        if len(low) != len(text):   # lowercasing moved offsets (rare letters): match the words one by one
            ms = list(WORD_RE.finditer(text))
            lows = [m.group(0).lower() for m in ms]
        else:
            ms = list(WORD_RE.finditer(low))
            lows = [m.group(0) for m in ms]
        if "'s" in low:
            lows = [w[:-2] if w.endswith("'s") and len(w) > 2 else w for w in lows]
        n = len(ms)

        def initial(j: int) -> bool:   # starts a sentence: the first word, or after a sentence mark
            return j == 0 or any(c in _SENTENCE_MARKS for c in text[ms[j - 1].end(): ms[j].start()])

        if capitals is not None and low != text:
            for j in range(1, n):
                a, b = ms[j].start(), ms[j].end()
                if (text[a].isupper() and b - a > 1 and not text[a:b].isupper() and lows[j] not in NOT_NAMES
                        and not initial(j)):
                    capitals.append((a, b))
        starts, lengths = self._starts, self._lengths
        if starts.isdisjoint(lows):
            return []
        get_items, get_attrs, get_concepts = self._items.get, self._attrs.get, self._concepts.get
        out: list[Mention] = []
        i = 0
        while i < n:
            found = None
            if lows[i] not in starts:
                i += 1
                continue
            longer = lengths.get((lows[i], lows[i + 1]), ()) if i + 1 < n else ()
            for length in longer + (1,):
                if i + length > n:
                    continue
                key = tuple(lows[i:i + length])
                items, attrs, concepts = get_items(key, ()), get_attrs(key, ()), get_concepts(key)
                if concepts is None and not items and not attrs:
                    continue
                start, end = ms[i].start(), ms[i + length - 1].end()
                if concepts is not None and (length > 1 or key[0] not in AMBIGUOUS_GENRE_WORDS
                                             or (i + length < n and lows[i + length] in FILM_NOUNS)):
                    found = Mention(start, end, tuple(items), tuple(attrs), concepts, key in self._genre_keys)
                elif items or (attrs and not all(x in self.attr_concepts for x in attrs)):
                    capital = any(text[ms[i + j].start()].isupper() and not initial(i + j) for j in range(length))
                    if length == 1:
                        name_ok = len(key[0]) >= 2 and capital and key[0] not in NOT_NAMES
                    else:
                        name_ok = capital or sum(w not in COMMON_WORDS for w in key) >= min_rare
                    if name_ok:
                        non_genre = tuple(x for x in attrs if x not in self.attr_concepts)
                        found = Mention(start, end, tuple(items), non_genre, frozenset(), False)
                if found is not None:
                    i += length
                    break
            if found is None:
                i += 1
            else:
                out.append(found)
        return out

    def in_template(self, template: str) -> str | None:
        """The first genre word, catalog name or title of a template's text outside its slots."""
        literal = _SLOT.sub(lambda m: "\x00" * len(m.group(0)), template)
        found = self.mentions(literal, min_rare=2)
        return found[0].text(literal) if found else None


__all__ = ["AMBIGUOUS_GENRE_WORDS", "COMMON_WORDS", "FILM_NOUNS", "GENRE_WORDS", "Mention", "NameMatcher", "STUDIO_WORDS",
           "name_key", "plural", "strip_possessive"]
