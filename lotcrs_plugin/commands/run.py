"""`crslab run`: train and test a system from a config (CRSLab's models or the plugin's)."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "train and test the system a YAML config describes (default: the demo, LOT-CRS beside the plain backbone)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: the demo, LOT-CRS beside the "
                        "plain backbone on the built-in synthetic dataset, one table and a plot)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change one config key after the files, validated like them; VALUE is read "
                        "as YAML; a dotted key reaches into a block, e.g. --set lotcrs.epochs=5 --set seed=7 "
                        "(repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged config (its base: chain and every --set applied) as YAML "
                        "and exit, without loading any data")
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
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train in N processes on this machine (torchrun; LOT-CRS systems): with --gpu, "
                        "one per listed GPU; on CPU, N gloo processes. Same global batch and lr as one process")
    parser.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"),
                        help="torch.distributed backend with several processes (default: the config's "
                        "distributed.backend, auto: nccl on GPUs, gloo on CPU)")


def launch_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line that runs this command in ``args.nproc`` processes."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "lotcrs_plugin.cli"]
    if args.debug:
        cmd.append("--debug")
    cmd.append(NAME)
    for flag, value in (("--config", args.config), ("--gpu", args.gpu), ("--seed", args.seed),
                        ("--output-root", args.output_root), ("--dist-backend", args.dist_backend)):
        if value is not None:
            cmd += [flag, str(value)]
    for expr in args.overrides:
        cmd += ["--set", expr]
    for flag in ("save_system", "restore_system", "save_data", "restore_data", "tensorboard"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    return cmd


def merged_config_text(args: argparse.Namespace) -> str:
    """The config a run would use, as YAML, headed by comments naming the files merged (and the
    overrides): keys and types are validated, nothing else is read."""
    import yaml

    from lotcrs_plugin import config as run_config
    from lotcrs_plugin.runner import DEMO_CONFIG

    loaded = run_config.load(args.config or DEMO_CONFIG, args.overrides)
    opt = loaded.opt
    if args.seed is not None:
        opt["seed"] = args.seed
    header = [f"# {loaded.files[0]}"] + [f"#   over base {f}" for f in loaded.files[1:]]
    header += [f"#   --set {o}" for o in loaded.overrides] + ([f"#   --seed {args.seed}"] if args.seed is not None else [])
    class Dumper(yaml.SafeDumper):
        """Mappings as blocks, lists of plain values on one line ([0, 0.5, 1]), as configs are written."""

    def represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flat = all(not isinstance(v, (dict, list)) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    Dumper.add_representer(list, represent_list)
    body = yaml.dump(opt, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from lotcrs_plugin.errors import UserError

    if args.print_config:
        print(merged_config_text(args), end="")
        return 0
    if args.config is None:
        return run_demo(args)
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, not {args.nproc}")
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if args.nproc > 1 and not launched:  # start torchrun, which runs this command in each process
        if args.interact:
            raise UserError("--interact talks to one process; leave out --nproc")
        import subprocess

        return subprocess.call(launch_command(args))

    from loguru import logger

    from lotcrs_plugin.report import format_result
    from lotcrs_plugin.runner import run as run_system

    # The command owns its process, so it sets the console level (a library caller keeps its own);
    # with several processes, the others than process 0 show warnings and errors only.
    main = int(os.environ.get("RANK", "0") or 0) == 0
    logger.remove()
    logger.add(sys.stderr, level=("DEBUG" if args.debug else "INFO") if main else "WARNING")
    result = run_system(
        args.config, gpu=args.gpu, seed=args.seed, output_root=args.output_root,
        save_system=args.save_system, restore_system=args.restore_system, interact=args.interact,
        tensorboard=args.tensorboard, debug=args.debug, save_data=args.save_data,
        restore_data=args.restore_data, dist_backend=args.dist_backend, overrides=args.overrides,
    )
    if not args.interact and main:
        print(format_result(result))
    return 0


# what the demo refuses: each shapes one run, and the demo is two
ONE_RUN_FLAGS = {"overrides": "--set", "save_system": "--save-system", "restore_system": "--restore-system",
                 "interact": "--interact", "save_data": "--save-data", "restore_data": "--restore-data",
                 "tensorboard": "--tensorboard"}


def run_demo(args: argparse.Namespace) -> int:
    """No --config: LOT-CRS and the plain backbone on the synthetic dataset (lotcrs_plugin.demo)."""
    import sys

    from loguru import logger

    from lotcrs_plugin.errors import UserError
    from lotcrs_plugin.runner import DEMO_CONFIG

    given = [flag for key, flag in ONE_RUN_FLAGS.items() if getattr(args, key)]
    if args.nproc > 1:
        given.append("--nproc")
    if given:
        raise UserError(f"{', '.join(given)} need(s) --config: with no --config, `crslab run` is the demo, two runs "
                        f"side by side; for one of them give --config {DEMO_CONFIG}")
    from lotcrs_plugin.demo import run_demo as demo

    logger.remove()  # the runs' logs go to their log files; the console shows progress and the table
    logger.add(sys.stderr, level="DEBUG" if args.debug else "WARNING")
    result = demo(seed=args.seed, gpu=args.gpu, output_root=args.output_root)
    row = result.compared.rows[0]
    print(f"LOT-CRS beside the plain backbone on the built-in synthetic dataset, test split "
          f"(tail: {row.get('tail_definition')}, {row.get('tail_size')} of {row.get('catalog_size')} items):")
    print(result.table)
    for path in (result.compared.markdown, result.compared.csv, *result.compared.plots):
        print(f"wrote {path}")
    return 0
