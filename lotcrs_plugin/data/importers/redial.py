"""The official raw ReDial format: conversation jsonl files, movies_with_mentions.csv, and an
optional movie-attribute JSON ``{movieId: {name, genre[], director[], star[], writer[], plot}}``.

Items are all movies of the CSV (its order is the catalog order), named by their CSV name with
white space collapsed; names that occur twice get `` [<movieId>]``. With attributes, genres and
people become entities, linked to movies in the KG (movie -genre/director/star/writer-> value)
and found in the utterances by whole-word, case-insensitive phrase matching.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lotcrs_plugin.data.importers.common import (
    STOPWORDS,
    Catalog,
    PhraseMatcher,
    RawDialog,
    RawTurn,
    dedupe,
    iter_jsonl,
    read_json,
    tokenize,
)
from lotcrs_plugin.errors import UserError

MENTION_RE = re.compile(r"@(\d+)")
RELATIONS = ("genre", "director", "star", "writer")
# A placeholder for a movie mention while linking entities, so that words of a movie's title
# are not linked as genres or people; it tokenizes to a symbol that starts no phrase.
_MASK = " \x00 "


def _clean(name: str) -> str:
    return " ".join(name.split())


class RedialReader:
    def __init__(self, movies: Path, attributes: Path | None, merge_turns: bool = True) -> None:
        self.movies_path = movies
        self.attributes_path = attributes
        self.merge_turns = merge_turns
        self._read_movies()
        self._read_attributes()

    # ------------------------------------------------------------------ catalog
    def _read_movies(self) -> None:
        path = self.movies_path
        try:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
        except csv.Error as e:
            raise UserError(f"{path}: malformed CSV ({e})") from None
        if not rows:
            raise UserError(f"{path}: empty file; expected a header movieId,movieName,nbMentions")
        header = [h.strip() for h in rows[0]]
        try:
            col_id, col_name = header.index("movieId"), header.index("movieName")
        except ValueError:
            raise UserError(f"{path}:1: header {','.join(header)!r} lacks movieId and movieName "
                            f"(expected movieId,movieName,nbMentions)") from None
        col_count = header.index("nbMentions") if "nbMentions" in header else None
        ids: list[str] = []
        raw_names: dict[str, str] = {}
        counts: dict[str, int] = {}
        line_of: dict[str, int] = {}
        for lineno, row in enumerate(rows[1:], 2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise UserError(f"{path}:{lineno}: expected {len(header)} columns ({','.join(header)}), "
                                f"got {len(row)}")
            mid, name = row[col_id].strip(), _clean(row[col_name])
            if not mid.isdigit():
                raise UserError(f"{path}:{lineno}: movieId {mid!r} is not a number")
            if not name:
                raise UserError(f"{path}:{lineno}: movie {mid} has an empty movieName")
            if mid in raw_names:
                raise UserError(f"{path}:{lineno}: movieId {mid} already appeared on line {line_of[mid]}")
            if col_count is not None:
                value = row[col_count].strip()
                if not value.lstrip("-").isdigit():
                    raise UserError(f"{path}:{lineno}: nbMentions {value!r} is not an integer")
                counts[mid] = int(value)
            ids.append(mid)
            raw_names[mid] = name
            line_of[mid] = lineno
        if not ids:
            raise UserError(f"{path}: no movies; expected rows movieId,movieName,nbMentions")
        dup = Counter(raw_names.values())
        # every member of a clash is suffixed, so a name never depends on the row order
        self.entity_name = {m: (f"{raw_names[m]} [{m}]" if dup[raw_names[m]] > 1 else raw_names[m]) for m in ids}
        self.display_name = raw_names
        self.movie_ids = ids
        self.source_mentions = ({self.entity_name[m]: counts[m] for m in ids} if col_count is not None else None)
        self.n_duplicate_names = sum(c for c in dup.values() if c > 1)

    def _read_attributes(self) -> None:
        self.attributes: dict[str, dict] = {}
        self.kg: list[tuple[str, str, str]] = []
        self.value_entities: list[str] = []
        self.matcher = PhraseMatcher({})
        self.n_attribute_unknown = 0
        if self.attributes_path is None:
            return
        path = self.attributes_path
        data = read_json(path, "movie attributes")
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object {{movieId: {{genre, director, star, writer, plot}}}}")
        values: dict[str, dict[str, None]] = {"genre": {}, "person": {}}
        per_movie: list[tuple[str, dict[str, list[str]], str]] = []
        for mid in self.movie_ids:   # catalog order, so KG and entity order are deterministic
            a = data.get(mid)
            if a is None:
                continue
            if not isinstance(a, dict):
                raise UserError(f"{path}: the attributes of movie {mid} are not a JSON object")
            fields: dict[str, list[str]] = {}
            for rel in RELATIONS:
                v = a.get(rel) or []
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise UserError(f"{path}: movie {mid}: {rel!r} must be a list of strings")
                fields[rel] = dedupe(c for c in (_clean(x) for x in v) if c)
                kind = "genre" if rel == "genre" else "person"
                values[kind].update(dict.fromkeys(fields[rel]))
            plot = a.get("plot") or ""
            if not isinstance(plot, str):
                raise UserError(f"{path}: movie {mid}: 'plot' must be a string")
            per_movie.append((mid, fields, plot))
        self.n_attribute_unknown = sum(1 for k in data if k not in self.entity_name)

        items = set(self.entity_name.values())
        names: dict[tuple[str, str], str] = {}
        taken = set(items)
        for kind in ("genre", "person"):
            for v in sorted(values[kind]):
                # a value spelled like a movie (or a person spelled like a genre) gets its kind appended
                name = v if v not in taken else f"{v} ({kind})"
                names[(kind, v)] = name
                taken.add(name)
        self.value_entities = list(names.values())
        for mid, fields, plot in per_movie:
            movie = self.entity_name[mid]
            for rel in RELATIONS:
                kind = "genre" if rel == "genre" else "person"
                self.kg.extend((movie, rel, names[(kind, v)]) for v in fields[rel])
            self.attributes[movie] = {**{rel: fields[rel] for rel in RELATIONS}, "plot": plot}

        # surfaces that are ordinary words or too short to be names are not linked in text
        surfaces = {v: name for (kind, v), name in names.items()
                    if len(v) >= 3 and v.lower() not in STOPWORDS and any(ch.isalpha() for ch in v)}
        self.matcher = PhraseMatcher(surfaces)

    def catalog(self) -> Catalog:
        items = [self.entity_name[m] for m in self.movie_ids]
        return Catalog(entities=items + self.value_entities, item_names=items, kg=self.kg,
                       source_mentions=self.source_mentions, attributes=self.attributes)

    def source_info(self) -> dict[str, Any]:
        return {
            "movies": str(self.movies_path.resolve()),
            "attributes": str(self.attributes_path.resolve()) if self.attributes_path else None,
            "merge_consecutive_messages": self.merge_turns,
            "duplicate_movie_names_suffixed": self.n_duplicate_names,
            "attribute_entries_not_in_movies": self.n_attribute_unknown,
            "entity_linking": "genre and person names from the attributes, whole-word, case-insensitive",
        }

    # ------------------------------------------------------------------ dialogs
    def read_dialogs(self, path: Path) -> list[RawDialog]:
        dialogs = []
        names = self.display_name
        for lineno, conv in iter_jsonl(path):
            where = f"{path}:{lineno}"
            if not isinstance(conv, dict):
                raise UserError(f"{where}: expected a JSON object (a ReDial conversation)")
            for key in ("conversationId", "messages", "initiatorWorkerId", "respondentWorkerId"):
                if key not in conv:
                    raise UserError(f"{where}: the conversation lacks {key!r} (not the raw ReDial format?)")
            messages = conv["messages"]
            if not isinstance(messages, list):
                raise UserError(f"{where}: 'messages' must be a list")
            roles = {conv["initiatorWorkerId"]: "Seeker", conv["respondentWorkerId"]: "Recommender"}
            groups: list[tuple[str, list[str]]] = []   # (role, texts)
            for k, msg in enumerate(messages):
                if not isinstance(msg, dict) or not isinstance(msg.get("text"), str) or "senderWorkerId" not in msg:
                    raise UserError(f"{where}: message {k} must be an object with 'text' and 'senderWorkerId'")
                role = roles.get(msg["senderWorkerId"])
                if role is None:
                    raise UserError(f"{where}: message {k} was sent by worker {msg['senderWorkerId']}, "
                                    f"neither the initiator nor the respondent")
                if self.merge_turns and groups and groups[-1][0] == role:
                    groups[-1][1].append(msg["text"])
                else:
                    groups.append((role, [msg["text"]]))
            turns = []
            for role, texts in groups:
                text = " ".join(t.strip() for t in texts)
                ids = MENTION_RE.findall(text)
                for mid in ids:
                    if mid not in names:
                        raise UserError(f"{where}: unknown movie id @{mid} (not in {self.movies_path.name}); "
                                        f"every @<movieId> must be a row of the movie list")
                raw_text = " ".join(MENTION_RE.sub(lambda m: names[m.group(1)], text).split())
                entity = self.matcher.find(tokenize(MENTION_RE.sub(_MASK, text))) if len(self.matcher) else []
                turns.append(RawTurn(role=role, raw_text=raw_text,
                                     movies=dedupe(self.entity_name[m] for m in ids), entity=entity))
            if turns:
                dialogs.append(RawDialog(conv_id=str(conv["conversationId"]), turns=turns, where=where))
        return dialogs
