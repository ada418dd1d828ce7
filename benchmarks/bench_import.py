"""Wall time of `crslab import-data` on the shared INSPIRED (UniCRS format) and ReDial (raw,
train_partial.jsonl with valid and test carved from it) files: a fresh process per run, so the
times include Python start-up and imports (median and max of N runs).

    python benchmarks/bench_import.py [--data ../shared/data] [--runs 3] [--out benchmarks/results/import_times.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
# The command module run as `crslab import-data` would run it (independent of the CLI wiring).
RUNNER = ("import argparse, sys; from lotcrs_plugin.commands import import_data as m; "
          "p = argparse.ArgumentParser(); m.add_arguments(p); sys.exit(m.run(p.parse_args(sys.argv[1:])))")


def jobs(data: Path) -> dict[str, list[str]]:
    i, r = data / "inspired", data / "redial"
    return {
        "INSPIRED (unicrs, given 801/99/99 split)": [
            "--format", "unicrs", "--name", "inspired_unicrs", "--train", str(i / "train_data_dbpedia.jsonl"),
            "--valid", str(i / "valid_data_dbpedia.jsonl"), "--test", str(i / "test_data_dbpedia.jsonl")],
        "ReDial (raw, train_partial.jsonl, valid/test carved 10%/10%, with attributes)": [
            "--format", "redial", "--name", "redial_partial", "--train", str(r / "train_partial.jsonl"),
            "--movies", str(r / "movies_with_mentions.csv"), "--attributes", str(r / "movie_attributes.json")],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("LOTCRS_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.data / "inspired").is_dir() or not (args.data / "redial").is_dir():
        sys.exit(f"no shared data at {args.data}; give --data or set LOTCRS_SHARED_DATA")
    load = os.getloadavg()[0]   # the machine is shared: other work inflates the times
    rows, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, argv in jobs(args.data).items():
            times = []
            for k in range(args.runs):
                out = Path(tmp) / f"{argv[3]}_{k}"
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", RUNNER, *argv, "--out", str(out), "--quiet"],
                                      check=True, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
            summaries.append(proc.stdout.splitlines()[0].replace(str(out), "<out>"))
            rows.append(f"| {label} | {statistics.median(times):.2f} | {max(times):.2f} |")
            print(rows[-1], flush=True)
    command = "crslab import-data " + " ".join(a if not a.startswith("/") else os.path.relpath(a, REPO)
                                                for a in argv)
    text = "\n".join([
        "# `crslab import-data` times",
        "",
        f"Device: this 2-core CPU machine ({cpu_name()}, {os.cpu_count()} logical CPUs), "
        f"{platform.system()}, Python {platform.python_version()}; {args.runs} runs each, a fresh "
        f"process per run (Python start-up and imports included); 1-min load average at the start "
        f"{load:.1f} (above 0 when other jobs share the machine). Budget: 60 s each.",
        f"Command: `python benchmarks/bench_import.py --runs {args.runs}`",
        "",
        "| import | median s | max s |",
        "| --- | --- | --- |",
        *rows,
        "",
        "What was written:",
        "",
        *[f"- `{s}`" for s in summaries],
        "",
        f"The last one as a command: `{command} --out DIR`",
        "",
    ])
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
