"""`crslab list`: every registered dataset, model, system, dataloader and evaluator."""

from __future__ import annotations

import argparse
import json

NAME = "list"
HELP = "list the registered datasets, models, systems, dataloaders and evaluators (CRSLab's and plugins')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from lotcrs_plugin.registry import listing

    tables = listing()
    if args.json:
        print(json.dumps(tables, indent=2))
        return 0
    for table, owners in tables.items():
        print(f"{table}s:")
        for owner, names in owners.items():
            print(f"  {owner}: {', '.join(names) if names else '-'}")
    return 0
