"""`crslab import-data`: convert raw ReDial or UniCRS-format data into the processed layout."""

from __future__ import annotations

import argparse

NAME = "import-data"
HELP = "convert raw ReDial or UniCRS-format data into a dataset the plugin and CRSLab read"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=("redial", "unicrs"),
                        help="redial: official ReDial jsonl + --movies CSV [+ --attributes JSON]; "
                             "unicrs: one JSON list of turns per line + KG files in --kg-dir")
    parser.add_argument("--name", help="dataset name (default: the --out folder's name); must not be "
                        "a CRSLab dataset name (ReDial, Inspired, ...) or 'synthetic'")
    parser.add_argument("--train", required=True, help="training dialogs (jsonl)")
    parser.add_argument("--valid", help="validation dialogs (jsonl); default: carved from --train")
    parser.add_argument("--test", help="test dialogs (jsonl); default: carved from --train")
    parser.add_argument("--movies", help="redial: movies_with_mentions.csv (movieId,movieName,nbMentions)")
    parser.add_argument("--attributes", help="redial, optional: movie attributes JSON "
                        "{movieId: {genre[], director[], star[], writer[], plot}} (gives entities and the KG)")
    parser.add_argument("--kg-dir", help="unicrs: folder with entity2id.json, item_ids.json, "
                        "dbpedia_subkg.json, relation2id.json (default: the folder of --train)")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="share of --train conversations carved out as valid when --valid is not given (0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="share of --train conversations carved out as test when --test is not given (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the carving (0)")
    parser.add_argument("--tail-threshold", type=int, default=4,
                        help="an item is tail when its mention count is at most this (4, as LOT-CRS on ReDial)")
    parser.add_argument("--word-min-freq", type=int, default=5,
                        help="minimum train frequency of a concept word (5)")
    parser.add_argument("--no-merge-turns", action="store_true",
                        help="redial: keep consecutive messages of one sender as separate turns")
    parser.add_argument("--out", help="output folder (default: <root>/data/dataset/<name>)")
    parser.add_argument("--output-root", help="root folder when --out is not given "
                        "(default: $LOTCRS_HOME, else ~/.cache/lotcrs)")
    parser.add_argument("--force", action="store_true", help="replace an existing imported dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def run(args: argparse.Namespace) -> int:
    import time

    from lotcrs_plugin.data.importers import import_dataset
    from lotcrs_plugin.data.importers.common import no_progress, stderr_progress

    start = time.perf_counter()
    result = import_dataset(
        args.format, args.train, name=args.name, valid=args.valid, test=args.test,
        movies=args.movies, attributes=args.attributes, kg_dir=args.kg_dir,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, seed=args.seed,
        out=args.out, output_root=args.output_root, force=args.force,
        tail_threshold=args.tail_threshold, word_min_freq=args.word_min_freq,
        merge_turns=not args.no_merge_turns,
        progress=no_progress if args.quiet else stderr_progress,
    )
    print(result.summary())
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0
