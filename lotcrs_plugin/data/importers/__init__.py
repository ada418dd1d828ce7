"""Importers: real CRS data (raw ReDial, UniCRS format) into the processed layout of
docs/DATA_LAYOUT.md, which ``lotcrs_plugin.data.processed.ProcessedDataset`` reads.

    from lotcrs_plugin.data.importers import import_dataset
    result = import_dataset("redial", "train_partial.jsonl", name="redial_partial",
                            movies="movies_with_mentions.csv", attributes="movie_attributes.json")
    print(result.summary())

The command-line front end is ``crslab import-data`` (lotcrs_plugin/commands/import_data.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lotcrs_plugin.data.importers.common import (
    RESERVED_NAMES,
    ImportResult,
    Progress,
    RawDialog,
    SplitSource,
    carve_split,
    check_destination,
    check_name,
    no_progress,
    require_file,
    tokenize,
    write_dataset,
)
from lotcrs_plugin.errors import UserError

FORMATS = ("redial", "unicrs")
PathLike = str | os.PathLike


def import_dataset(
    fmt: str,
    train: PathLike,
    *,
    name: str | None = None,
    valid: PathLike | None = None,
    test: PathLike | None = None,
    movies: PathLike | None = None,
    attributes: PathLike | None = None,
    kg_dir: PathLike | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    out: PathLike | None = None,
    output_root: PathLike | None = None,
    force: bool = False,
    tail_threshold: int = 4,
    word_min_freq: int = 5,
    merge_turns: bool = True,
    progress: Progress | None = None,
) -> ImportResult:
    """Convert one dataset and write it to ``out`` (default: <root>/data/dataset/<name>).

    fmt: 'redial' (raw ReDial jsonl + ``movies`` CSV [+ ``attributes`` JSON]) or 'unicrs'
    (UniCRS dialog jsonl + the KG files in ``kg_dir``, default the train file's folder).
    A split without a file is carved from train: ``valid_fraction`` / ``test_fraction`` of its
    conversations, chosen by ``seed``. ``tail_threshold``: an item is tail when its
    source_mentions (ReDial) or train_mentions (UniCRS) is at most this. ``word_min_freq``: a
    content word is a concept word when it occurs at least this often in train.
    ``merge_turns``: ReDial only; join consecutive messages of one sender into one turn.
    Raises UserError for bad input; nothing is left behind then.
    """
    from lotcrs_plugin.paths import Layout, active_layout, resolve_root

    progress = progress or no_progress
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if name is None:
        if out is None:
            raise UserError("give a dataset name (--name) or an output folder (--out)")
        name = Path(out).expanduser().resolve().name
    check_name(name)
    layout = Layout(resolve_root(output_root)) if output_root else active_layout()
    dest = Path(out).expanduser().resolve() if out is not None else layout.dataset / name
    check_destination(dest, force)
    if not isinstance(tail_threshold, int) or tail_threshold < 0:
        raise UserError(f"tail threshold must be a non-negative integer, got {tail_threshold!r}")
    if not isinstance(word_min_freq, int) or word_min_freq < 1:
        raise UserError(f"word min frequency must be a positive integer, got {word_min_freq!r}")

    files = {"train": require_file(train, "--train")}
    for split, path in (("valid", valid), ("test", test)):
        if path is not None:
            files[split] = require_file(path, f"--{split}")

    if fmt == "redial":
        from lotcrs_plugin.data.importers.redial import RedialReader

        if kg_dir is not None:
            raise UserError("--kg-dir applies to --format unicrs; for redial give --movies and --attributes")
        if movies is None:
            raise UserError("--format redial needs --movies (movies_with_mentions.csv: movieId,movieName,nbMentions)")
        progress("reading the movie list" + (" and attributes" if attributes else ""))
        reader: Any = RedialReader(require_file(movies, "--movies"),
                                   require_file(attributes, "--attributes") if attributes is not None else None,
                                   merge_turns=merge_turns)

        def read(path: Path, split: str) -> list[RawDialog]:
            return reader.read_dialogs(path)

        # the form the long-tail evaluator and the synthetic generator use: "<count> <= threshold"
        tail = {"definition": "source_mentions <= threshold", "threshold": tail_threshold}
    else:
        from lotcrs_plugin.data.importers.unicrs import UnicrsReader

        if movies is not None or attributes is not None:
            raise UserError("--movies and --attributes apply to --format redial; for unicrs give --kg-dir")
        kg = Path(kg_dir).expanduser() if kg_dir is not None else files["train"].parent
        progress(f"reading the KG files in {kg}")
        reader = UnicrsReader(kg)
        read = reader.read_dialogs
        tail = {"definition": "train_mentions <= threshold", "threshold": tail_threshold}

    splits: dict[str, SplitSource] = {}
    for split, path in files.items():
        progress(f"reading {split}: {path}")
        dialogs = read(path, split)
        if not dialogs:
            raise UserError(f"{path}: the {split} split has no dialogs; give a file with at least one conversation")
        splits[split] = SplitSource(dialogs, {"file": str(path.resolve()), "dialogs": len(dialogs)})
    missing = {s: f for s, f in (("valid", valid_fraction), ("test", test_fraction)) if s not in files}
    if missing:
        carved = carve_split(splits["train"].dialogs, missing, seed, str(files["train"]))
        splits["train"] = SplitSource(carved["train"], {
            **splits["train"].origin, "dialogs": len(carved["train"]),
            "dialogs_in_file": len(splits["train"].dialogs)})
        for s, frac in missing.items():
            splits[s] = SplitSource(carved[s], {
                "carved_from": "train", "fraction": frac, "seed": seed, "dialogs": len(carved[s]),
                "method": "conversations ranked by sha256('<seed>:<conv_id>'); valid, then test, "
                          "take the next max(1, round(fraction * n)) of the ranking; the rest stay in train"})
    source = {
        "importer": "lotcrs_plugin.data.importers",
        "input_format": fmt,
        "splits": {s: splits[s].origin for s in ("train", "valid", "test")},
        "tokenizer": "lowercased regex word tokenizer in nltk Treebank style (lotcrs_plugin.data.importers.common)",
        "concept_words": f"non-stopword alphabetic train tokens occurring at least {word_min_freq} times",
        **reader.source_info(),
    }
    return write_dataset(name=name, dest=dest, force=force, catalog=reader.catalog(), splits=splits,
                         source=source, tail=tail, word_min_freq=word_min_freq, progress=progress)


__all__ = ["FORMATS", "RESERVED_NAMES", "ImportResult", "import_dataset", "tokenize"]
