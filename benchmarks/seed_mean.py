"""The mean over seeds of finished runs' test metrics, as a Markdown table (issue 12's goals).

Each argument is ``label=a.json,b.json`` (the results JSONs of one config run with different
seeds); the metrics are the long-tail report's, on all test samples and on 'unmentioned', with the
run's ``test_variants`` (e.g. without tail slots) as rows of their own.

    python benchmarks/seed_mean.py "LOT-CRS=$R/s42.json,$R/s43.json" "plain=$R/plain.json"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = [("", "recall@10", "R@10"), ("", "recall@50", "R@50"), ("unmentioned", "recall@10", "unm R@10"),
           ("unmentioned", "tail_recall@10", "unm TailR@10"), ("unmentioned", "tail_recall@50", "unm TailR@50"),
           ("unmentioned", "tail_coverage@50", "unm TailCov@50")]


def _value(report: dict[str, Any], subset: str, key: str) -> float | None:
    part = report["subsets"].get(subset) if subset else report
    return None if part is None else part["metrics"].get(key)


def rows_of(label: str, files: list[Path]) -> list[tuple[str, list[dict[str, Any]], list[str]]]:
    results = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    seeds = [str(r.get("config", {}).get("seed", "?")) for r in results]
    out = [(label, [r["test"]["longtail"] for r in results], seeds)]
    variants = sorted(set().union(*[set(r.get("test_variants") or {}) for r in results]))
    for name in variants:
        reports = [r["test_variants"][name] for r in results if (r.get("test_variants") or {}).get(name)]
        if len(reports) == len(results):
            out.append((f"{label} ({name.replace('_', ' ')})", reports, seeds))
    return out


def table(specs: list[str]) -> str:
    lines = ["| run | seeds | " + " | ".join(h for _, _, h in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for spec in specs:
        label, _, files = spec.partition("=")
        for name, reports, seeds in rows_of(label, [Path(f) for f in files.split(",")]):
            cells = []
            for subset, key, _ in COLUMNS:
                values = [_value(r, subset, key) for r in reports]
                if any(v is None for v in values):
                    cells.append("-")
                    continue
                mean = sum(values) / len(values)
                cells.append(f"{mean:.4f}" + (f" ({' / '.join(f'{v:.4f}' for v in values)})" if len(values) > 1 else ""))
            lines.append(f"| {name} | {', '.join(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="label=a.json[,b.json...]")
    print(table(ap.parse_args().runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
