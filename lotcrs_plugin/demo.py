"""`crslab run` with no ``--config``: LOT-CRS beside the plain backbone on the built-in synthetic data.

Both configs (lotcrs_plugin/configs/lotcrs_demo_plain.yaml and lotcrs_demo.yaml: the same tiny
BERT and fine-tuning, the second with pre-training on the balanced simulation, retrieval and label
smoothness) run through :func:`lotcrs_plugin.compare.compare`, which writes the Markdown and CSV
tables and the plot of recall against tail coverage under ``<root>/demo/``. This module adds the
one table the command prints: recall@1/10/50 on all test samples, on the 'unmentioned' ones (the
target not named earlier in the dialog) and on those whose target is a tail item, with the
coverage of the tail, one column per model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lotcrs_plugin.compare import CompareOutput, Row, compare

CONFIGS_DIR = Path(__file__).with_name("configs")
# the plain model first: the table reads left to right as "without, with"
DEMO_CONFIGS: tuple[Path, ...] = (CONFIGS_DIR / "lotcrs_demo_plain.yaml", CONFIGS_DIR / "lotcrs_demo.yaml")
LABELS = {"lotcrs_demo_plain": "plain backbone", "lotcrs_demo": "LOT-CRS"}
KS = (1, 10, 50)
SUBSET = "unmentioned"


@dataclass
class DemoOutput:
    compared: CompareOutput
    table: str


def label(row: Row) -> str:
    stem = Path(row.config).stem
    return LABELS.get(stem, stem)


def _cell(value: object) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def side_by_side(rows: Sequence[Row]) -> str:
    """One Markdown table, a column per run: recall@k on all test samples, on the 'unmentioned'
    subset and on the tail-target samples, then the share of tail items in the top-k lists."""
    first = rows[0]
    n, n_tail = first.get("n_test"), first.get("n_tail_test")
    n_sub = first.get(f"{SUBSET}:n_test")
    groups = [(f"all ({n})", "recall@{k}"), (f"{SUBSET} ({n_sub})", f"{SUBSET}:recall@{{k}}"),
              (f"tail ({n_tail})", "tail_recall@{k}")]
    lines = ["| test samples | metric | " + " | ".join(label(r) for r in rows) + " |",
             "|---|---|" + "---:|" * len(rows)]
    for group, key in groups:
        for k in KS:
            name = key.format(k=k)
            lines.append(f"| {group} | R@{k} | " + " | ".join(_cell(r.get(name)) for r in rows) + " |")
    for k in (10, 50):
        lines.append(f"| tail items | TailCov@{k} | "
                     + " | ".join(_cell(r.get(f"tail_coverage@{k}")) for r in rows) + " |")
    return "\n".join(lines)


def run_demo(configs: Sequence[str | Path] = DEMO_CONFIGS, *, out: str | Path | None = None,
             seed: int | None = None, gpu: str = "-1", output_root: str | None = None,
             progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
             ) -> DemoOutput:
    """Run ``configs`` afresh (not from compare's cache: the demo is the run) and build the table;
    ``out`` defaults to ``<root>/demo``."""
    from lotcrs_plugin.errors import UserError
    from lotcrs_plugin.paths import resolve_root

    out = Path(out) if out is not None else resolve_root(output_root) / "demo"
    compared = compare(configs, out=out, name="demo", rerun=True, seed=seed, gpu=gpu, output_root=output_root,
                       command="crslab run", title="LOT-CRS beside the plain backbone (synthetic)",
                       progress=progress)
    failed = [r for r in compared.rows if r.status != "ok"]
    if failed:
        raise UserError("; ".join(f"{r.config}: {r.get('error')}" for r in failed))
    # one column per config (compare adds rows for a model's test variants, e.g. without tail slots)
    stems = {Path(c).stem for c in configs}
    return DemoOutput(compared, side_by_side([r for r in compared.rows if r.config in stems]))
