"""Wall time of `crslab --help`, `crslab --version` and `crslab list` (median of N runs).

    python benchmarks/bench_cli.py [--runs 10] [--out benchmarks/results/cli_times.md]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_command(cmd: list[str], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    exe = shutil.which("crslab", path=str(Path(sys.executable).parent)) or shutil.which("crslab")
    if exe is None:
        sys.exit("crslab is not installed in this environment; run: bash install.sh")
    rows = []
    for argv in (["--version"], ["--help"], ["list"], ["list", "--json"]):
        med, worst = time_command([exe, *argv], args.runs)
        rows.append(f"| `crslab {' '.join(argv)}` | {med * 1000:.0f} | {worst * 1000:.0f} |")
        print(rows[-1])
    baseline, _ = time_command([sys.executable, "-c", "import torch"], 3)
    text = "\n".join([
        "# `crslab` command start-up times",
        "",
        f"Device: {platform.processor() or platform.machine()}, {platform.system()}, "
        f"Python {platform.python_version()}; {args.runs} runs each.",
        f"Command: `python benchmarks/bench_cli.py --runs {args.runs}`",
        "",
        "| command | median ms | max ms |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"For scale: `python -c 'import torch'` alone takes {baseline * 1000:.0f} ms here; "
        "--help and list import neither torch nor crslab.",
        "",
    ])
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
