"""Time and peak memory of the balanced-data simulator (lotcrs_plugin.data.simulator.simulate).

Datasets: ReDial (raw train_partial.jsonl + the full 6,924-movie catalog with attributes) and
INSPIRED (UniCRS format), imported with the plugin's importer from the shared files, and
synthetic catalogs of growing size (lotcrs_plugin.data.synthetic) for the scaling. Every run is
a fresh process that calls simulate() once, uncached (catalog loading, template mining,
generation and writing included); the parent records the call's time, the process's wall time
and its peak RSS. The runs of one dataset must give byte-identical files (same seed).
Also writes sample conversations (head and tail items) of each real dataset.

    python benchmarks/bench_simulator.py [--data ../shared/data] [--runs 3] [--per-item 20]
        [--scales 1000,10000,100000] [--results benchmarks/results]

The samples also count the turns that contradict their own thread (a genre, person or title
that is not the target's: lotcrs_plugin.data.simulator.consistency) over the whole simulation.
Only the samples, from processed dataset folders, without the timing runs; --before NAME=DIR
also counts an earlier simulation of the same folder (e.g. one of an older simulator version):

    python benchmarks/bench_simulator.py --samples-only $LOTCRS_HOME/data/dataset/redial_partial \
        [--before ReDial=/tmp/old_sim]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]


USAGE = [
    "## The same from the command line", "",
    "```",
    "crslab import-data --format redial --name redial_partial --train ../shared/data/redial/train_partial.jsonl \\",
    "    --movies ../shared/data/redial/movies_with_mentions.csv --attributes ../shared/data/redial/movie_attributes.json",
    "crslab simulate --config run.yaml --show 5          # run.yaml: 'dataset: redial_partial' + a 'simulation:' block",
    "crslab simulate --dataset-dir <root>/data/dataset/redial_partial --per-item 20 --out /tmp/sim --show 5",
    "```", "",
    "(`crslab simulate` is lotcrs_plugin/commands/simulate.py; until it is wired into the CLI: "
    "`python -c \"import argparse,sys; from lotcrs_plugin.commands import simulate as m; "
    "p=argparse.ArgumentParser(); m.add_arguments(p); sys.exit(m.run(p.parse_args(sys.argv[1:])))\" ARGS`.)", "",
]


def child(folder: str, per_item: int, out: str) -> None:
    """One measured run (in its own process): simulate, then report as JSON on stdout."""
    import resource

    from lotcrs_plugin.data.simulator import SimulationConfig, load_stats, simulate

    start = time.perf_counter()
    path = simulate(folder, SimulationConfig(per_item=per_item), out_dir=out)
    seconds = time.perf_counter() - start
    stats = load_stats(path)
    data = path / "simulated_data.json"
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "conversations": stats["conversations"], "turns": stats["turns"], "items": stats["items"],
        "bytes": data.stat().st_size, "sha256": _sha256(data),
        "gini": stats["gini_target_frequency"], "mined_share": stats["mined_template_share"]["turns"],
    }))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def measure(folder: Path, per_item: int, runs: int, tmp: Path) -> dict:
    results = []
    for k in range(runs):
        out = tmp / f"run-{folder.name}-{k}"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(folder), "--per-item", str(per_item),
                               "--child-out", str(out)], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"run on {folder} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall"] = wall
        results.append(r)
        if k < runs - 1:
            shutil.rmtree(out)   # keep the last one for samples
    hashes = {r["sha256"] for r in results}
    first = results[0]
    return {
        "items": first["items"], "conversations": first["conversations"], "turns": first["turns"],
        "mb": first["bytes"] / 2**20, "gini": first["gini"], "mined_share": first["mined_share"],
        "median_s": statistics.median(r["seconds"] for r in results),
        "max_s": max(r["seconds"] for r in results),
        "median_wall": statistics.median(r["wall"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "identical": len(hashes) == 1, "runs": runs, "out": tmp / f"run-{folder.name}-{runs - 1}",
    }


def thread_check(dataset: Path, sim: Path) -> dict:
    """Turns of the simulation at ``sim`` that name something outside their thread."""
    sys.path.insert(0, str(REPO))
    from lotcrs_plugin.data.catalog import Catalog
    from lotcrs_plugin.data.simulator import load_stats
    from lotcrs_plugin.data.simulator.consistency import ThreadChecker

    start = time.perf_counter()
    report = ThreadChecker(Catalog.from_folder(dataset)).check_folder(sim, examples=5)
    report["simulator_version"] = load_stats(sim).get("simulator_version")
    report["check_seconds"] = round(time.perf_counter() - start, 1)
    return report


def _consistency_lines(after: dict, before: dict | None, before_dir: Path | None) -> list[str]:
    rows = [("this simulation", after)] + ([(f"earlier simulation `{before_dir.name}` (--before)", before)]
                                           if before and before_dir else [])
    lines = ["## Thread consistency", "",
             "Turns that name a genre (also in other words: \"scary\" is horror, \"funny\" comedy), a studio "
             "(\"disney movies\"), a person or a title that is not in their dialog's thread (the target's attributes, the target, the related "
             "items the dialog lists), counted over the whole simulation by "
             "`lotcrs_plugin.data.simulator.consistency.ThreadChecker`.", "",
             "| simulation | simulator version | dialogs | turns | contradicting turns | contradicting dialogs | findings by kind |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in rows:
        share = r["contradicting_turns"] / r["turns"] if r["turns"] else 0.0
        lines.append(f"| {label} | {r['simulator_version']} | {r['dialogs']} | {r['turns']} | "
                     f"{r['contradicting_turns']} ({100 * share:.2f}%) | {r['contradicting_dialogs']} | "
                     f"{json.dumps(r['findings_by_kind']) if r['findings_by_kind'] else '-'} |")
    for label, r in rows:
        if r["top_words"]:
            lines += ["", f"Most frequent contradicting words, {label}: "
                      + ", ".join(f"{w} ({n})" for w, n in list(r["top_words"].items())[:10]) + "."]
            lines += ["", "Examples:", "", "```"] + [f"[{e['conv_id']} turn {e['turn']}] {e['what']} "
                                                    f"'{e['surface']}': {e['text']}" for e in r["examples"]] + ["```"]
    return lines + [""]


def write_samples(name: str, dataset: Path, sim: Path, dest: Path, n_each: int = 10,
                  before: Path | None = None, command: str = "python benchmarks/bench_simulator.py") -> None:
    """n_each conversations of head items (most train mentions) and of tail items (never
    mentioned in train), one per item, with the statistics and the thread check (of an earlier
    simulation ``before`` too)."""
    sys.path.insert(0, str(REPO))
    from lotcrs_plugin.commands.simulate import format_dialog
    from lotcrs_plugin.data.simulator import iter_simulated, load_stats

    item_stats = json.loads((dataset / "item_stats.json").read_text(encoding="utf-8"))
    ranked = sorted(item_stats, key=lambda e: (-item_stats[e]["train_mentions"], int(e)))
    head = ranked[:n_each]
    tail_pool = [e for e in ranked if item_stats[e]["train_mentions"] == 0]
    step = max(1, len(tail_pool) // n_each)
    tail = tail_pool[::step][:n_each]
    want = {f"sim-{e}-0": ("head", e) for e in head} | {f"sim-{e}-0": ("tail", e) for e in tail}
    found: dict[str, dict] = {}
    for d in iter_simulated(sim):
        if d["conv_id"] in want:
            found[d["conv_id"]] = d
            if len(found) == len(want):
                break
    stats = load_stats(sim)
    keep = ("conversations", "turns", "items", "per_item", "conversations_per_item", "gini_target_frequency",
            "gini_real_train_mentions", "items_never_mentioned_in_train", "items_without_attributes",
            "thread_length_before_target", "thread_elements_by_kind", "reasons_by_kind", "slots_filled_by_kind",
            "mined_template_share", "seconds")
    print(f"checking the threads of {name} ...", file=sys.stderr, flush=True)
    check_after = thread_check(dataset, sim)
    check_before = thread_check(dataset, before) if before is not None else None
    lines = [f"# Simulated conversations: {name}", "",
             f"Dataset folder made by `crslab import-data` from the shared files; simulation with the "
             f"default `simulation:` settings (per_item {stats['per_item']}, seed 0), written by "
             f"`{command}` (commit {_commit()}, {cpu_name()}, no GPU). One conversation (index 0 of {stats['per_item']}) "
             f"for each of {len(head)} head items (most training mentions) and {len(tail)} tail items "
             f"(no training mention), target in brackets after `<` on the recommendation turn.", "",
             *_consistency_lines(check_after, check_before, before),
             "## Statistics", "", "```json", json.dumps({k: stats[k] for k in keep}, indent=1), "```", "",
             "Templates per act (built-in or mined) and mining report:", "", "```json",
             json.dumps({"templates": stats["templates"], "mining": stats["mining"]}, indent=1), "```", ""]
    for part in ("head", "tail"):
        lines += [f"## {part.title()} items", ""]
        for conv_id, (p, e) in want.items():
            if p != part or conv_id not in found:
                continue
            s = item_stats[e]
            lines += [f"Target: **{s['name']}** (train mentions {s['train_mentions']}"
                      + (f", source mentions {s['source_mentions']}" if s.get("source_mentions") is not None else "")
                      + ")", "", "```", format_dialog(found[conv_id]), "```", ""]
    dest.write_text("\n".join(lines), encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _commit() -> str:
    """The checkout's commit (once: the files this script writes would make it look changed)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _display_name(folder: Path) -> str:
    low = folder.name.lower()
    return "ReDial" if low.startswith("redial") else "INSPIRED" if low.startswith("inspired") else folder.name


def samples_only(folders: list[Path], before: dict[str, Path], per_item: int, results: Path, argv: list[str]) -> None:
    """Simulate each processed folder (default settings) and write its samples file."""
    sys.path.insert(0, str(REPO))
    from lotcrs_plugin.data.simulator import SimulationConfig, simulate

    command = "python benchmarks/bench_simulator.py " + " ".join(argv)
    home = os.environ.get("LOTCRS_HOME")
    if home:
        command = command.replace(home.rstrip("/"), "$LOTCRS_HOME")
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as tmp_name:
        for folder in folders:
            name = _display_name(folder)
            print(f"simulating {name} ...", file=sys.stderr, flush=True)
            out = simulate(folder, SimulationConfig(per_item=per_item), out_dir=Path(tmp_name) / folder.name)
            write_samples(name, folder, out, results / f"simulator_samples_{name.lower()}.md",
                          before=before.get(name), command=command)
            shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("LOTCRS_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-item", type=int, default=20)
    parser.add_argument("--scales", default="1000,10000,100000",
                        help="synthetic catalog sizes (items); the largest is run once")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--samples-only", nargs="+", type=Path, metavar="DATASET_DIR",
                        help="only write the samples files of these processed dataset folders (no timing)")
    parser.add_argument("--before", action="append", default=[], metavar="NAME=SIM_DIR",
                        help="also check an earlier simulation of dataset NAME (ReDial, INSPIRED)")
    parser.add_argument("--child")
    parser.add_argument("--child-out")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.per_item, args.child_out)
        return
    before: dict[str, Path] = {}
    for b in args.before:
        name, sep, path = b.partition("=")
        if not sep or not Path(path).is_dir():
            sys.exit(f"--before takes NAME=SIM_DIR with an existing folder, not {b!r}")
        before[name] = Path(path)
    if args.samples_only:
        samples_only(args.samples_only, before, args.per_item, args.results, sys.argv[1:])
        return

    sys.path.insert(0, str(REPO))
    from lotcrs_plugin.data.importers import import_dataset
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.generator import generate
    from lotcrs_plugin.data.synthetic.words import GENRES, MAX_PEOPLE

    load = os.getloadavg()[0]
    rows: list[tuple[str, dict]] = []
    scale_rows: list[tuple[int, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as tmp_name:
        tmp = Path(tmp_name)
        real: dict[str, Path] = {}
        r, i = args.data / "redial", args.data / "inspired"
        if (r / "train_partial.jsonl").is_file():
            real["ReDial"] = import_dataset(
                "redial", r / "train_partial.jsonl", name="redial_partial", out=tmp / "redial_partial",
                movies=r / "movies_with_mentions.csv", attributes=r / "movie_attributes.json").path
        if (i / "train_data_dbpedia.jsonl").is_file():
            real["INSPIRED"] = import_dataset(
                "unicrs", i / "train_data_dbpedia.jsonl", name="inspired_unicrs", out=tmp / "inspired_unicrs",
                valid=i / "valid_data_dbpedia.jsonl", test=i / "test_data_dbpedia.jsonl").path
        for name, folder in real.items():
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            m = measure(folder, args.per_item, args.runs, tmp)
            rows.append((name, m))
            write_samples(name, folder, m["out"], args.results / f"simulator_samples_{name.lower()}.md",
                          before=before.get(name))
            shutil.rmtree(m["out"])
        scales = [int(s) for s in args.scales.split(",") if s]
        for n in scales:
            folder = tmp / f"synthetic_{n}"
            print(f"measuring synthetic {n} items ...", file=sys.stderr, flush=True)
            generate(SyntheticConfig(
                n_items=n, n_conversations=2000, n_people=min(MAX_PEOPLE, 2 * n),
                n_genres=len(GENRES), seed=0), folder)
            m = measure(folder, args.per_item, 1 if n == max(scales) and len(scales) > 1 else args.runs, tmp)
            shutil.rmtree(m["out"])
            shutil.rmtree(folder)
            scale_rows.append((n, m))

    base = scale_rows[0][1] if scale_rows else None
    cmd = "python benchmarks/bench_simulator.py" + (f" --runs {args.runs}" if args.runs != 3 else "") + (
        f" --per-item {args.per_item}" if args.per_item != 20 else "")
    lines = [
        "# Balanced-data simulator: time and memory", "",
        f"Device: this 2-core CPU machine ({cpu_name()}, {os.cpu_count()} logical CPUs), {platform.system()}, "
        f"Python {platform.python_version()}; 1-min load average at the start {load:.1f} (the machine is "
        f"shared: other jobs inflate the times). Budget: ReDial, {args.per_item} conversations per item, "
        f"at most 10 s and 1 GiB.",
        f"Command: `{cmd}` (a fresh process per run; `simulate s` is the simulate() call, uncached: "
        f"catalog, template mining, generation, writing; `process s` adds Python start-up and imports; "
        f"peak RSS is the process's ru_maxrss).", "",
        "## Real datasets", "",
        "| dataset | items | conversations | turns | output MB | simulate s (median / max) | process s | peak RSS MB | runs identical | mined share | Gini |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in rows:
        lines.append(f"| {name} | {m['items']} | {m['conversations']} | {m['turns']} | {m['mb']:.0f} | "
                     f"{m['median_s']:.2f} / {m['max_s']:.2f} | {m['median_wall']:.2f} | {m['peak_rss_mb']:.0f} | "
                     f"{'yes' if m['identical'] else 'NO'} ({m['runs']}) | {m['mined_share']:.2f} | {m['gini']:.3f} |")
    if scale_rows:
        lines += ["", f"## Growth with the catalog (synthetic, {args.per_item} conversations per item)", "",
                  "Synthetic catalogs of lotcrs_plugin.data.synthetic (20 genres; a pool of people twice "
                  "the number of items, at most 65,600, as directors, stars and writers; 2,000 training "
                  "dialogs to mine); the largest size is run once. Time grows linearly with the number "
                  "of conversations; memory with the catalog (its KG is loaded whole), not with the "
                  "output, which is written in chunks of 16,384 conversations.", "",
                  "| items | x | conversations | turns | output MB | simulate s | s per 1M conversations | peak RSS MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n, m in scale_rows:
            lines.append(f"| {n} | {n / scale_rows[0][0]:g} | {m['conversations']} | {m['turns']} | {m['mb']:.0f} | "
                         f"{m['median_s']:.2f} | {m['median_s'] / m['conversations'] * 1e6:.1f} | {m['peak_rss_mb']:.0f} |")
    lines += ["", "Samples: " + ", ".join(f"`simulator_samples_{n.lower()}.md`" for n, _ in rows), ""]
    lines += USAGE
    (args.results / "simulator.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
