"""The `crslab` command (CRSLab itself has none).

Subcommands live in lotcrs_plugin/commands/<name>.py (NAME, HELP, add_arguments, run) and
import heavy modules only inside run(), so `crslab --help` and `crslab list` stay quick.
Bad input prints one line and exits 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lotcrs_plugin import __version__
from lotcrs_plugin.errors import UserError

# Subcommand modules, in the order `crslab --help` lists them.
COMMAND_MODULES = (
    "lotcrs_plugin.commands.run",
    "lotcrs_plugin.commands.list",
    "lotcrs_plugin.commands.import_data",
    "lotcrs_plugin.commands.simulate",
    "lotcrs_plugin.commands.compare",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crslab",
        description="CRSLab on today's Python stack, with LOT-CRS long-tail recommendation.",
    )
    parser.add_argument("--version", action="version", version=f"lotcrs_plugin {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and debug logs")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        if args.debug:
            raise
        print(f"crslab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("crslab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
