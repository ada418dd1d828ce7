"""`crslab compare`: several runs side by side (Markdown and CSV table, two plots)."""

from __future__ import annotations

import argparse
import shlex

NAME = "compare"
HELP = ("run several configs (or read finished results JSONs) and write a side-by-side table "
        "(Markdown, CSV) and plots of accuracy against long-tail coverage")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help="YAML configs to run, in table order")
    parser.add_argument("--results", nargs="+", action="extend", default=[], metavar="FILE.json",
                        help="results JSONs of finished runs (<root>/results/*.json) to add as rows")
    parser.add_argument("--out", help="output folder (default: <root>/compare)")
    parser.add_argument("--name", default="compare", help="file name prefix of the outputs (default: compare)")
    parser.add_argument("--rerun", action="store_true",
                        help="run every config again instead of reusing its cached result "
                             "(<root>/compare/cache, keyed by the config's content and the seed)")
    parser.add_argument("--seed", type=int, help="random seed for every config (overrides their `seed`)")
    parser.add_argument("--gpu", default="-1", help="GPU indices, e.g. 0; -1 for CPU (default)")
    parser.add_argument("--output-root", help="folder for datasets, logs, results and the cache "
                        "(default: $LOTCRS_HOME, else ~/.cache/lotcrs)")
    parser.add_argument("--bucket-k", type=int, default=10,
                        help="the top-k lists whose popularity buckets are plotted (default: 10)")
    parser.add_argument("--title", help="heading of the Markdown file")
    parser.add_argument("--note", action="append", default=[], help="a line added to the Markdown file (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="show the runs' training logs")


def command_line(args: argparse.Namespace) -> str:
    """The command as a user would type it to make the same outputs."""
    parts = ["crslab", "compare", *map(str, args.configs)]
    if args.results:
        parts += ["--results", *map(str, args.results)]
    for flag, value in (("--out", args.out), ("--name", args.name if args.name != "compare" else None),
                        ("--seed", args.seed), ("--gpu", args.gpu if args.gpu != "-1" else None),
                        ("--output-root", args.output_root),
                        ("--bucket-k", args.bucket_k if args.bucket_k != 10 else None),
                        ("--title", args.title)):
        if value is not None:
            parts += [flag, str(value)]
    if args.rerun:
        parts.append("--rerun")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    import sys

    from loguru import logger

    from lotcrs_plugin.compare import compare, markdown_table
    from lotcrs_plugin.errors import UserError
    from lotcrs_plugin.paths import resolve_root

    if args.bucket_k < 1:
        raise UserError(f"--bucket-k must be a positive integer, not {args.bucket_k}")
    logger.remove()
    debug = getattr(args, "debug", False)
    logger.add(sys.stderr, level="DEBUG" if debug else "INFO" if args.verbose else "WARNING")
    out = args.out or str(resolve_root(args.output_root) / "compare")
    result = compare(
        args.configs, args.results, out=out, name=args.name, rerun=args.rerun, seed=args.seed,
        gpu=args.gpu, output_root=args.output_root, bucket_k=args.bucket_k,
        command=command_line(args), notes=args.note, title=args.title,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(markdown_table(result.rows))
    for path in (result.markdown, result.csv, *result.plots):
        print(f"wrote {path}")
    failed = sum(r.status != "ok" for r in result.rows)
    return 1 if failed == len(result.rows) else 0
