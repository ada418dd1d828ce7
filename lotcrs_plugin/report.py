"""Plain-text tables of run results, for the terminal."""

from __future__ import annotations

from typing import Any


def format_metrics(metrics: dict[str, Any]) -> str:
    names = sorted(metrics)
    width = max((len(n) for n in names), default=0)
    lines = []
    for n in names:
        v = metrics[n]
        lines.append(f"  {n:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {n:<{width}}  {v}")
    return "\n".join(lines)


def format_result(result) -> str:
    out = [f"== {result.model_name} on {result.dataset}: test results ({result.seconds:.1f} s) =="]
    for stage, metrics in result.test.items():
        if stage == "rec" and "longtail" in result.test:
            continue  # the long-tail table repeats CRSLab's hit/ndcg/mrr as recall/ndcg/mrr
        if stage == "longtail":
            from lotcrs_plugin.evaluator.report import format_report

            out.append(format_report(metrics))
            continue
        out.append(f"[{stage}]")
        out.append(format_metrics(metrics))
    if not result.test:
        out.append("(no test metrics were reported)")
    out.append(f"results: {result.results_file}")
    out.append(f"log:     {result.log_file}")
    return "\n".join(out)
