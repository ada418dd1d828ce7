"""Side-by-side results of several runs (``crslab compare``): one row per config or results
JSON, written as Markdown and CSV, and two plots (matplotlib, Agg).

A row is read from a results JSON of :func:`lotcrs_plugin.runner.run` (``asdict(RunResult)``):
the long-tail report of the rec test pass (``test.longtail``, from ``evaluator: longtail``), else
CRSLab's hit/ndcg/mrr (``test.rec``); the tested epoch from ``selection``. A config that fails
becomes a row with its one-line error; the comparison goes on.

Finished runs are cached under ``<root>/compare/cache/<config stem>-<hash>.json`` (the hash is
of the config's parsed content and the seed), so an interrupted comparison resumes where it stopped;
``rerun=True`` runs every config again.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lotcrs_plugin.errors import UserError

# (csv key, markdown header); metric keys are the long-tail report's names.
METRIC_COLUMNS: list[tuple[str, str]] = [
    ("recall@1", "R@1"), ("recall@10", "R@10"), ("recall@50", "R@50"),
    ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10"),
    ("coverage@10", "Cov@10"), ("coverage@50", "Cov@50"),
    ("tail_coverage@10", "TailCov@10"), ("tail_coverage@50", "TailCov@50"),
    ("tail_recall@10", "TailR@10"), ("tail_recall@50", "TailR@50"),
    ("avg_popularity@10", "AvgPop@10"), ("gini@10", "Gini@10"),
]
CSV_COLUMNS: list[str] = (
    ["config", "status", "model", "dataset"] + [k for k, _ in METRIC_COLUMNS]
    + ["selected_epoch", "last_epoch", "selection_metric", "selection_score", "seconds",
       "n_test", "n_tail_test", "tail_definition", "catalog_size", "tail_size", "device", "commit", "error"]
)
CRSLAB_TO_REPORT = {"hit": "recall", "ndcg": "ndcg", "mrr": "mrr"}  # test.rec -> report names


@dataclass
class Row:
    """One line of the table; ``buckets`` (the popularity histogram) feeds the second plot."""

    config: str
    status: str = "ok"
    values: dict[str, Any] = field(default_factory=dict)
    buckets: dict[str, Any] | None = None

    def get(self, key: str) -> Any:
        return self.values.get(key)


# ---- rows --------------------------------------------------------------------------------------

def row_from_result(result: dict[str, Any], config: str, device: str = "") -> Row:
    """A table row from a results JSON (``asdict(RunResult)``)."""
    test = result.get("test") or {}
    longtail = test.get("longtail") or {}
    values: dict[str, Any] = {"model": result.get("model_name", ""), "dataset": result.get("dataset", "")}
    metrics = dict(longtail.get("metrics") or {})
    for name, value in (test.get("rec") or {}).items():  # `evaluator: rec` / `standard` runs
        crslab_name, _, k = name.partition("@")
        if crslab_name in CRSLAB_TO_REPORT:
            metrics.setdefault(f"{CRSLAB_TO_REPORT[crslab_name]}@{k}", value)
    values.update(metrics)  # every metric of the report, beyond the table's (the demo reads tail_recall@1)
    for key, _ in METRIC_COLUMNS:
        values[key] = metrics.get(key)
    selection = result.get("selection") or {}
    values.update(
        selected_epoch=selection.get("selected_epoch"), last_epoch=selection.get("last_epoch"),
        selection_metric=selection.get("metric"), selection_score=selection.get("validation_score"),
        seconds=result.get("seconds"), n_test=longtail.get("n_samples"),
        n_tail_test=longtail.get("n_tail_samples"), device=device, commit=result.get("commit") or "",
    )
    tail = longtail.get("tail") or {}
    values.update(tail_definition=tail.get("definition"), catalog_size=tail.get("catalog_size"),
                  tail_size=tail.get("tail_size"))
    for subset, part in (longtail.get("subsets") or {}).items():  # e.g. 'unmentioned' (LOT-CRS samples)
        sub = part.get("metrics") or {}
        values.update({f"{subset}:{key}": value for key, value in sub.items()})
        for key, _ in METRIC_COLUMNS:
            values[f"{subset}:{key}"] = sub.get(key)
        values[f"{subset}:n_test"], values[f"{subset}:n_tail_test"] = part.get("n_samples"), part.get("n_tail_samples")
    notes = list(selection.get("notes") or [])
    if not metrics:
        notes.append("no recommendation test metrics in the results")
    values["error"] = "; ".join(notes)
    return Row(config, "ok", values, longtail.get("popularity_buckets"))


def rows_from_result(result: dict[str, Any], config: str, device: str = "") -> list[Row]:
    """The run's row, then one row per test variant of its model (``test_variants``, e.g. the
    LOT-CRS lists without tail slots), named ``<config> (<variant>)``."""
    rows = [row_from_result(result, config, device)]
    for name, report in sorted((result.get("test_variants") or {}).items()):
        if report:
            variant = {**result, "test": {"longtail": report}}
            rows.append(row_from_result(variant, f"{config} ({name.replace('_', ' ')})", device))
    return rows


def failed_row(config: str, error: BaseException | str, opt: dict | None = None) -> Row:
    """A row for a config that did not run: its model and dataset (when readable) and one line."""
    if isinstance(error, BaseException):
        first = (str(error).strip().splitlines() or [""])[0]
        if not isinstance(error, UserError):  # a crash: say where, since the message alone is often bare
            error = f"{type(error).__name__}: {first}{_where(error)}"
        else:
            error = first
    values: dict[str, Any] = {"error": str(error)}
    if opt:
        from lotcrs_plugin.config import model_name

        values["dataset"] = opt.get("dataset", "")
        try:
            values["model"] = model_name(opt)
        except (KeyError, TypeError):
            values["model"] = ""
    return Row(config, "failed", values)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    path = Path(frames[-1].filename).as_posix()
    for marker in ("site-packages/", "lotcrs_plugin/"):
        if marker in path:
            path = (marker if marker == "lotcrs_plugin/" else "") + path.split(marker, 1)[1]
            break
    return f" (at {path}:{frames[-1].lineno})"


def read_results(path: str | os.PathLike) -> Row:
    """A row from a finished results JSON; a missing or malformed file is a failed row."""
    return read_result_rows(path)[0]


def read_result_rows(path: str | os.PathLike) -> list[Row]:
    """The rows of a finished results JSON (its run, then its test variants); a missing or
    malformed file is one failed row."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [failed_row(p.stem, f"results file {p} not found")]
    except json.JSONDecodeError as err:
        return [failed_row(p.stem, f"{p}:{err.lineno}: not valid JSON ({err.msg})")]
    if not isinstance(data, dict) or "test" not in data:
        return [failed_row(p.stem, f"{p}: not a results JSON of `crslab run` (no 'test' key)")]
    return rows_from_result(data, p.stem, data.get("device", ""))


# ---- running configs ---------------------------------------------------------------------------

def device_description(gpu: str = "-1") -> str:
    """The machine a run used, in words (CPU model, cores, GPU)."""
    from lotcrs_plugin.hardware import cpu_info

    cpu = cpu_info().model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} CPU cores"
    if str(gpu) != "-1":
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{text}; GPU {', '.join(names) or gpu}"
    return f"{text}; no GPU"


def _cache_file(cache_dir: Path, config: Path, opt: dict, seed: int | None) -> Path:
    """Keyed by the config's content (comments and layout do not count) and the seed."""
    canonical = json.dumps({"config": opt, "seed": seed}, sort_keys=True, default=str)
    return cache_dir / f"{config.stem}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}.json"


def run_config(config: str | os.PathLike, *, cache_dir: Path, rerun: bool = False, seed: int | None = None,
               gpu: str = "-1", output_root: str | None = None) -> tuple[list[Row], bool]:
    """Run one config through the runner (or reuse its cached result): (its rows, reused)."""
    from lotcrs_plugin import config as run_config_module

    path = Path(config)
    opt = None
    try:
        opt = run_config_module.read_yaml(path)
        cache = _cache_file(cache_dir, path, opt, seed)
        if cache.is_file() and not rerun:
            entry = json.loads(cache.read_text(encoding="utf-8"))
            return rows_from_result(entry["result"], path.stem, entry.get("device", "")), True
        from dataclasses import asdict

        from lotcrs_plugin.runner import run

        result = asdict(run(str(path), gpu=gpu, seed=seed, output_root=output_root))
        device = device_description(gpu)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": str(path.resolve()), "device": device, "result": result},
                                  indent=1, default=str), encoding="utf-8")
        tmp.replace(cache)
        return rows_from_result(result, path.stem, device), False
    except Exception as err:  # noqa: BLE001 - one failed config must not end the comparison
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / f"{path.stem}.traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
        return [failed_row(path.stem, err, opt)], False
    finally:
        gc.collect()


# ---- output ------------------------------------------------------------------------------------

def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "seconds":
        return f"{value:.0f}"
    if key.startswith("avg_popularity"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def subsets_of(rows: Sequence[Row]) -> list[str]:
    """The sample subsets some row reports (e.g. 'unmentioned'), in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row.values:
            if key.endswith(":n_test"):
                seen.setdefault(key.split(":", 1)[0])
    return list(seen)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    columns = CSV_COLUMNS + [f"{s}:{k}" for s in subsets_of(rows)
                             for k in [k for k, _ in METRIC_COLUMNS] + ["n_test", "n_tail_test"]]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.config if c == "config" else row.status if c == "status"
                             else "" if row.get(c) is None else row.get(c) for c in columns])


def _epoch_cell(row: Row) -> str:
    sel, last = row.get("selected_epoch"), row.get("last_epoch")
    return "-" if sel is None else f"{sel}/{last}"


def _tail_cell(row: Row) -> str:
    if row.get("tail_definition") is None:
        return "-"
    return f"{row.get('tail_definition')} ({row.get('tail_size')}/{row.get('catalog_size')})"


def row_labels(rows: Sequence[Row]) -> list[str]:
    """The model name, with the config's (or results file's) name where several rows share it."""
    models = [row.get("model") or Path(row.config).stem for row in rows]
    return [f"{m} ({Path(row.config).stem})" if models.count(m) > 1 else m for m, row in zip(models, rows)]


def markdown_table(rows: Sequence[Row], subset: str | None = None) -> str:
    """The table of all test samples, or (``subset``) of that subset's samples; rows without the
    subset show '-' (CRSLab's own dataloaders do not flag it)."""
    headers = (["Model", "Dataset"] + [h for _, h in METRIC_COLUMNS]
               + ["Test n (tail)", "Epoch", "Seconds", "Tail (tail/catalog)", "Commit", "Notes"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    prefix = f"{subset}:" if subset else ""
    for label, row in zip(row_labels(rows), rows):
        note = row.get("error") or ""
        if row.status != "ok":
            note = f"**failed**: {note}"
        if subset and row.get(f"{subset}:n_test") is None and row.status == "ok":
            note = f"no '{subset}' subset in this run's report" + (f"; {note}" if note else "")
        n = row.get(prefix + "n_test")
        samples = "-" if n is None else f"{n} ({row.get(prefix + 'n_tail_test')})"
        cells = ([label, row.get("dataset") or "-"] + [_fmt(k, row.get(prefix + k)) for k, _ in METRIC_COLUMNS]
                 + [samples, _epoch_cell(row), _fmt("seconds", row.get("seconds")), _tail_cell(row),
                    row.get("commit") or "-", note.replace("|", "\\|")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "R@k = Recall@k (CRSLab's hit@k: one target per sample); NDCG@10, MRR@10 as CRSLab; "
    "Cov@k = share of the catalog in at least one top-k list; TailCov@k = share of the tail items "
    "in at least one top-k list; TailR@k = Recall@k over samples whose target is a tail item; "
    "AvgPop@10 = mean popularity count of the recommended items; Gini@10 = Gini index of how often "
    "each catalog item is recommended (0 = even). Epoch = the epoch whose model was tested "
    "(selected on validation) / the last validated epoch, 0-based. Test n (tail) = test samples "
    "(with a tail target): CRSLab's dataloaders differ (the TG-ReDial one used by Popularity, TextCNN, "
    "SASRec, GRU4Rec, BERT and TG-ReDial makes a sample per mentioned item in every turn; KBRD, KGSF "
    "and ReDial only in recommender turns), so compare rows with the same n. Seconds = wall time of "
    "the whole run (all stages, train + valid + test)."
)


SUBSET_NOTES = {
    "unmentioned": "Test samples whose target item was not named earlier in the dialog (by either "
                   "role): a ranker cannot answer them by repeating the context.",
}


def write_markdown(rows: Sequence[Row], path: Path, *, title: str, command: str = "",
                   notes: Sequence[str] = (), images: Sequence[Path] = ()) -> None:
    devices = sorted({r.get("device") for r in rows if r.get("device")})
    selections = sorted({r.get("selection_metric") for r in rows if r.get("selection_metric")})
    out = [f"# {title}", "", markdown_table(rows), ""]
    for subset in subsets_of(rows):
        out += [f"## Subset '{subset}'", "", SUBSET_NOTES.get(subset, ""), "", markdown_table(rows, subset), ""]
    out += [LEGEND, ""]
    if selections:
        out.append(f"Epoch selection metric (validation): {', '.join(selections)}.")
    tails = {}
    for r in rows:
        if r.get("dataset") and r.get("tail_definition") is not None:
            tails.setdefault(r.get("dataset"), r)
    for dataset, r in tails.items():
        out.append(f"Tail of {dataset}: {r.get('tail_definition')}: {r.get('tail_size')} of "
                   f"{r.get('catalog_size')} catalog items.")
    out = [line + "  " if line and not line.startswith(("#", "|")) else line for line in out]  # line breaks
    out.append("")
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        out += ["## Failed", ""] + [f"- {r.config}: {r.get('error')}" for r in failed] + [""]
    if images:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    out += ["## How it was made", ""]
    if command:
        out += ["```bash", command, "```", ""]
    out.append(f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}.")
    if devices:
        out.append(f"- Device: {'; '.join(devices)}.")
    out += [f"- {note}" for note in notes]
    path.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")


def _labels(rows: Sequence[Row]) -> dict[int, str]:
    """Plot labels by id(row): the table's labels, with the dataset where rows have several."""
    several = len({r.get("dataset") for r in rows}) > 1
    return {id(r): f"{label} ({r.get('dataset')})" if several else label for label, r in zip(row_labels(rows), rows)}


def _annotate_apart(ax: Any, points: list[tuple[float, float, str]], min_px: float = 11.0) -> None:
    """Label each point, moving a label up or down (in points) until it clears the labels placed."""
    placed: list[tuple[float, float]] = []
    ax.figure.canvas.draw()  # fixes the data -> display transform
    to_px = ax.transData.transform
    for x, y, text in sorted(points, key=lambda p: (p[0], -p[1])):
        px, py = to_px((x, y))
        for dy in (4, -12, 16, -24, 28, -36, 40, -48):
            ly = py + dy * ax.figure.dpi / 72
            if all(abs(ly - qy) >= min_px * ax.figure.dpi / 72 or abs(px - qx) > 120 for qx, qy in placed):
                break
        placed.append((px, ly))
        leader = None if dy == 4 else {"arrowstyle": "-", "lw": 0.5, "color": "0.5"}
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(14 if leader else 4, dy), fontsize=8,
                    va="center" if leader else "baseline", arrowprops=leader)


def plot_tradeoff(rows: Sequence[Row], path: Path) -> bool:
    """Recall@10 against Tail-Coverage@50, one labelled point per run; False when nothing to plot."""
    points = [r for r in rows if r.status == "ok" and r.get("recall@10") is not None
              and r.get("tail_coverage@50") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.get("dataset") for r in points})
    markers = "os^Dv<>P*X"
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, dataset in enumerate(datasets):
        mine = [r for r in points if r.get("dataset") == dataset]
        ax.scatter([r.get("tail_coverage@50") for r in mine], [r.get("recall@10") for r in mine],
                   marker=markers[i % len(markers)], s=45, label=dataset)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    labels = _labels(points)
    _annotate_apart(ax, [(r.get("tail_coverage@50"), r.get("recall@10"), labels[id(r)]) for r in points])
    ax.set_xlabel("Tail-Coverage@50 (share of tail items recommended)")
    ax.set_ylabel("Recall@10")
    ax.set_title("Accuracy against long-tail coverage (test)")
    ax.grid(True, alpha=0.3)
    if len(datasets) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_buckets(rows: Sequence[Row], path: Path, k: int = 10) -> bool:
    """Per dataset: the share of top-k list entries per popularity bucket for each run, next to the
    share of test targets and of catalog items; False when no run has the histogram."""
    have = [r for r in rows if r.status == "ok" and r.buckets and str(k) in r.buckets.get("recommended", {})]
    if not have:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = sorted({r.get("dataset") for r in have})
    names = dict(zip(map(id, have), row_labels(have)))
    n_buckets = max(len(r.buckets["labels"]) for r in have)
    width_in = max(8.0, 0.9 * n_buckets + 2)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(width_in, 4.2 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        mine = [r for r in have if r.get("dataset") == dataset]
        ref = mine[0].buckets
        labels = ref["labels"]
        x = np.arange(len(labels))
        series = [("catalog items", ref["catalog_items"], "#d0d0d0"), ("test targets", ref["targets"], "#303030")]
        series += [(names[id(r)], r.buckets["recommended"][str(k)], None) for r in mine
                   if r.buckets["labels"] == labels]
        bar = 0.85 / len(series)
        for i, (name, counts, color) in enumerate(series):
            counts = np.asarray(counts, dtype=float)
            share = counts / counts.sum() if counts.sum() else counts
            ax.bar(x - 0.425 + (i + 0.5) * bar, share, bar, label=name, color=color)
        ax.set_xticks(x, labels)
        ax.set_xlabel(f"popularity bucket ({ref.get('count_field', 'mentions')})")
        ax.set_ylabel("share")
        ax.set_title(f"{dataset}: top-{k} recommendations per popularity bucket vs test targets")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@dataclass
class CompareOutput:
    rows: list[Row]
    markdown: Path
    csv: Path
    plots: list[Path]


def compare(configs: Sequence[str | os.PathLike] = (), results: Sequence[str | os.PathLike] = (), *,
            out: str | os.PathLike, name: str = "compare", rerun: bool = False, seed: int | None = None,
            gpu: str = "-1", output_root: str | None = None, bucket_k: int = 10, command: str = "",
            notes: Sequence[str] = (), title: str | None = None,
            progress: Callable[[str], None] = lambda s: None) -> CompareOutput:
    """Run (or reuse) ``configs``, read ``results`` JSONs, and write ``<out>/<name>.{md,csv}`` and
    ``<out>/<name>_recall_vs_tail_coverage.png``, ``<out>/<name>_popularity_buckets.png``."""
    if not configs and not results:
        raise UserError("compare: give at least one CONFIG or --results FILE.json")
    if not name or "/" in name:
        raise UserError(f"--name must be a file name prefix without '/', not {name!r}")
    from lotcrs_plugin.paths import resolve_root

    cache_dir = resolve_root(output_root) / "compare" / "cache"
    rows: list[Row] = []
    for i, config in enumerate(configs, 1):
        progress(f"[{i}/{len(configs)}] {config} ...")
        started = time.perf_counter()
        config_rows, reused = run_config(config, cache_dir=cache_dir, rerun=rerun, seed=seed, gpu=gpu,
                                         output_root=output_root)
        rows.extend(config_rows)
        row = config_rows[0]
        what = "reused" if reused else f"{time.perf_counter() - started:.0f} s"
        if row.status == "ok":
            progress(f"[{i}/{len(configs)}] {config}: {what}; R@10 {_fmt('x', row.get('recall@10'))}, "
                     f"TailCov@50 {_fmt('x', row.get('tail_coverage@50'))}")
        else:
            progress(f"[{i}/{len(configs)}] {config}: FAILED ({row.get('error')})")
    rows += [row for r in results for row in read_result_rows(r)]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    tradeoff = out_dir / f"{name}_recall_vs_tail_coverage.png"
    if plot_tradeoff(rows, tradeoff):
        plots.append(tradeoff)
    buckets = out_dir / f"{name}_popularity_buckets.png"
    if plot_buckets(rows, buckets, bucket_k):
        plots.append(buckets)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    write_csv(rows, csv_path)
    write_markdown(rows, md_path, title=title or f"Comparison: {name}", command=command, notes=notes,
                   images=plots)
    return CompareOutput(rows, md_path, csv_path, plots)
