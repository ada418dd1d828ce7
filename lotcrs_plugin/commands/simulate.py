"""`crslab simulate`: the balanced simulated dataset of LOT-CRS for a processed dataset folder."""

from __future__ import annotations

import argparse

NAME = "simulate"
HELP = ("simulate a balanced CRS dataset: every catalog item the target of the same number of "
        "conversations (LOT-CRS step 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="run config YAML: 'dataset: <name>' (a folder under "
                        "<root>/data/dataset) and an optional 'simulation:' block")
    parser.add_argument("--dataset-dir", help="the processed dataset folder itself (instead of, or "
                        "overriding, the config's dataset)")
    parser.add_argument("--per-item", type=int, help="conversations per item (overrides simulation.per_item)")
    parser.add_argument("--seed", type=int, help="random seed (overrides simulation.seed)")
    parser.add_argument("--out", help="write simulated_data.json and simulation_stats.json into this "
                        "folder (default: the cache, <root>/data/simulated/<dataset>-<hash>)")
    parser.add_argument("--output-root", help="root folder (default: the config's output_root, "
                        "else $LOTCRS_HOME, else ~/.cache/lotcrs)")
    parser.add_argument("--show", type=int, default=0, metavar="K",
                        help="print K sample conversations (spread over the catalog)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def format_dialog(dialog: dict) -> str:
    """A simulated conversation as readable lines."""
    lines = [f"[{dialog['conv_id']}]"]
    for turn in dialog["dialog"]:
        links = turn["movies"] + turn["entity"]
        lines.append(f"  {turn['role']:<11} {turn['raw_text']}" + (f"   <{'; '.join(links)}>" if links else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lotcrs_plugin.config import read_yaml
    from lotcrs_plugin.data.simulator import SimulationConfig, find_simulated, iter_simulated, load_stats, simulate
    from lotcrs_plugin.errors import UserError
    from lotcrs_plugin.paths import Layout, resolve_root

    opt: dict = read_yaml(args.config) if args.config else {}
    where = args.config or "command line"
    block = opt.get("simulation") or {}
    if not isinstance(block, dict):
        raise UserError(f"{where}: key 'simulation' must be a mapping of settings")
    cfg = SimulationConfig.from_dict(block)
    if args.per_item is not None:
        cfg.per_item = args.per_item
    if args.seed is not None:
        cfg.seed = args.seed
    layout = Layout(resolve_root(args.output_root or opt.get("output_root")))
    if cfg.cache_dir is None:
        cfg.cache_dir = str(layout.data / "simulated")
    cfg.validate()
    if args.dataset_dir:
        folder = Path(args.dataset_dir).expanduser()
    elif opt.get("dataset"):
        folder = layout.dataset / str(opt["dataset"])
        if not folder.is_dir():
            have = sorted(p.name for p in layout.dataset.iterdir() if p.is_dir()) if layout.dataset.is_dir() else []
            raise UserError(f"{where}: dataset '{opt['dataset']}' has no folder {folder}; import it with "
                            f"`crslab import-data` or give --dataset-dir (folders there: {', '.join(have) or 'none'})")
    else:
        raise UserError("give --config FILE (with 'dataset: <name>') or --dataset-dir DIR")
    if args.show < 0:
        raise UserError(f"--show must be 0 or more, not {args.show}")

    fresh = find_simulated(folder, cfg, out_dir=args.out) is None
    out = simulate(folder, cfg, out_dir=args.out, progress=not args.quiet)
    stats = load_stats(out)
    print(f"simulated {stats['conversations']} conversations ({stats['per_item']} per item, "
          f"{stats['items']} items, {stats['turns']} turns) in {out}")
    print(f"conversations per item: {stats['conversations_per_item']['min']}..{stats['conversations_per_item']['max']}; "
          f"Gini of targets {stats['gini_target_frequency']:.3f} (real train mentions "
          f"{stats['gini_real_train_mentions']:.3f}); mined template share {stats['mined_template_share']['turns']:.2f}; "
          f"{'generated in %.1f s' % stats['seconds'] if fresh else 'found in the cache'}")
    if args.show:
        n = stats["conversations"]
        per = stats["per_item"]
        k = min(args.show, n)
        # spread over the catalog: evenly spaced items, a different conversation index each
        wanted = {(i * (n // per) // k) * per + (i % per) for i in range(k)}
        for idx, dialog in enumerate(iter_simulated(out)):
            if idx in wanted:
                print()
                print(format_dialog(dialog))
                wanted.discard(idx)
                if not wanted:
                    break
    return 0
