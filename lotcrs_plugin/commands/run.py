"""`crslab run`: train and test a system from a config (CRSLab's models or the plugin's)."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "train and test the system a YAML config describes (default: the embedded demo config)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: the embedded demo, "
                        "a CRSLab TextCNN on the built-in synthetic dataset)")
    parser.add_argument("--gpu", default="-1", help="GPU indices, e.g. 0 or 0,1; -1 for CPU (default)")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config's `seed`)")
    parser.add_argument("--output-root", help="folder for datasets, checkpoints, logs and results "
                        "(default: $LOTCRS_HOME, else ~/.cache/lotcrs)")
    parser.add_argument("--save-system", action="store_true", help="save the trained system")
    parser.add_argument("--restore-system", action="store_true", help="load a saved system before fit/interact")
    parser.add_argument("--save-data", action="store_true", help="save the processed dataset")
    parser.add_argument("--restore-data", action="store_true", help="load the saved processed dataset")
    parser.add_argument("--tensorboard", action="store_true", help="write tensorboard logs under <root>/runs")
    parser.add_argument("--interact", action="store_true", help="talk to the system instead of training")


def run(args: argparse.Namespace) -> int:
    import sys

    from loguru import logger

    from lotcrs_plugin.report import format_result
    from lotcrs_plugin.runner import run as run_system

    # The command owns its process, so it sets the console level (a library caller keeps its own).
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.debug else "INFO")
    result = run_system(
        args.config, gpu=args.gpu, seed=args.seed, output_root=args.output_root,
        save_system=args.save_system, restore_system=args.restore_system, interact=args.interact,
        tensorboard=args.tensorboard, debug=args.debug, save_data=args.save_data,
        restore_data=args.restore_data,
    )
    if not args.interact:
        print(format_result(result))
    return 0
