"""The long-tail report (``LongTailEvaluator.last_report``) as a plain-text table."""

from __future__ import annotations

from typing import Any

from lotcrs_plugin.evaluator.metrics import LONGTAIL_METRICS


def format_report(report: dict[str, Any]) -> str:
    """A table with one row per metric and one column per k, the tail definition above it,
    then the same table for every subset."""
    tail = report["tail"]
    lines = [
        f"long-tail metrics ({report['mode']}): {_samples(report)}",
        f"  catalog {tail['catalog_size']} items; tail {tail['tail_size']} items = {tail['definition']}"
        f" (popularity: {tail['count_field']} from {tail['popularity_source']}); "
        f"index space: {report['index_space']}",
    ]
    lines += _table(report["metrics"], report["ks"])
    for name, part in report.get("subsets", {}).items():
        lines.append(f"  subset '{name}': {_samples(part)}")
        lines += _table(part["metrics"], report["ks"])
    return "\n".join(lines)


def _samples(part: dict[str, Any]) -> str:
    return f"{part['n_samples']} samples, {part['n_tail_samples']} with a tail target"


def _table(metrics: dict[str, Any], ks: list[int]) -> list[str]:
    if not metrics:
        return ["    (no samples)"]
    names = [cls.name for cls in LONGTAIL_METRICS]
    width = max(len(n) for n in names)
    rows = ["    " + " " * width + "".join(f"{'@' + str(k):>10}" for k in ks)]
    for n in names:
        cells = "".join(f"{_cell(metrics.get(f'{n}@{k}')):>10}" for k in ks)
        rows.append(f"    {n:<{width}}{cells}")
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) >= 100 else f"{v:.4f}"
