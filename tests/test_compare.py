"""`crslab compare`: runs tiny configs into a table (Markdown, CSV) and plots, reports a failed
config as a row; the popularity-bucket histogram against a hand-computed example."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import yaml

from lotcrs_plugin.commands import compare as command
from lotcrs_plugin.compare import CSV_COLUMNS, METRIC_COLUMNS
from lotcrs_plugin.evaluator.buckets import bucket_bounds, bucket_labels, bucket_of, popularity_histogram
from lotcrs_plugin.evaluator.catalog import Catalog
from lotcrs_plugin.evaluator.config import LongTailConfig
from lotcrs_plugin.evaluator.metrics import RankData

TINY = {"n_items": 60, "n_conversations": 160, "seed": 3}
PNG = b"\x89PNG\r\n\x1a\n"


def _write(path, opt: dict) -> str:
    path.write_text(yaml.safe_dump(opt))
    return str(path)


def _configs(tmp_path) -> list[str]:
    common = {"dataset": "synthetic", "synthetic": dict(TINY), "tokenize": {"rec": "nltk"},
              "context_truncate": 64, "item_truncate": 20, "evaluator": "longtail",
              "longtail": {"count": "train_mentions", "threshold": 2}}
    popularity = {**common, "rec_model": "Popularity",
                  "rec": {"epoch": 1, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.001},
                          "lr_bert": 0.001}}
    textcnn = {**common, "rec_model": "TextCNN", "embed": 32, "num_filters": 32, "filter_sizes": "(2, 3)",
               "dropout": 0.1, "rec": {"epoch": 2, "batch_size": 64, "optimizer": {"name": "Adam", "lr": 0.003},
                                       "lr_bert": 0.001}}
    broken = {**textcnn, "rec_model": "TextCNNN"}  # unknown model: a one-line UserError
    return [_write(tmp_path / "pop.yaml", popularity), _write(tmp_path / "cnn.yaml", textcnn),
            _write(tmp_path / "broken.yaml", broken)]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_compare_writes_table_plots_and_a_failed_row(tmp_path, capsys):
    configs = _configs(tmp_path)
    out = tmp_path / "out"
    assert command.run(_args([*configs, "--out", str(out), "--name", "tiny", "--note", "made by a test"])) == 0
    with (out / "tiny.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    for key in ("recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@10", "coverage@50",
                "tail_coverage@10", "tail_coverage@50", "tail_recall@10", "tail_recall@50",
                "avg_popularity@10", "gini@10", "selected_epoch", "seconds", "tail_definition",
                "catalog_size", "tail_size"):
        assert key in CSV_COLUMNS
    pop, cnn, broken = rows
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert (pop["model"], cnn["model"], broken["model"]) == ("Popularity", "TextCNN", "TextCNNN")
    assert "unknown rec_model 'TextCNNN'" in broken["error"] and "\n" not in broken["error"]
    for row in (pop, cnn):
        assert row["dataset"] == "synthetic" and row["catalog_size"] == "60"
        assert row["tail_definition"] == "train_mentions <= 2" and int(row["tail_size"]) > 0
        assert 0.0 <= float(row["recall@10"]) <= float(row["recall@50"]) <= 1.0
        assert 0.0 < float(row["coverage@10"]) <= float(row["coverage@50"]) <= 1.0
        assert float(row["seconds"]) > 0
    assert cnn["selected_epoch"] in ("0", "1") and cnn["last_epoch"] == "1"
    # popularity ranks one list for everyone: 10 of 60 items covered at k=10
    assert float(pop["coverage@10"]) == pytest.approx(10 / 60)
    md = (out / "tiny.md").read_text()
    header = md.splitlines()[2]
    assert all(f" {h} " in header for _, h in METRIC_COLUMNS) and "Epoch" in header
    assert "**failed**: " in md and "unknown rec_model 'TextCNNN'" in md
    assert "crslab compare " in md and "--name tiny" in md and "made by a test" in md and "Device:" in md
    for png in ("tiny_recall_vs_tail_coverage.png", "tiny_popularity_buckets.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert "| Popularity | synthetic |" in capsys.readouterr().out


def test_compare_reuses_cached_runs_and_reads_results_files(tmp_path, capsys, lotcrs_home):
    configs = _configs(tmp_path)[:1]
    out = tmp_path / "out"
    assert command.run(_args([*configs, "--out", str(out)])) == 0
    capsys.readouterr()
    import json

    cached = sorted((lotcrs_home / "compare" / "cache").glob("pop-*.json"))
    assert len(cached) == 1
    results = json.loads(cached[0].read_text())["result"]["results_file"]
    assert command.run(_args([*configs, "--results", str(results), str(tmp_path / "missing.json"),
                              "--out", str(out)])) == 0
    assert "reused" in capsys.readouterr().err
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[0]["recall@10"] == rows[1]["recall@10"]  # the cached run and its results JSON
    assert "not found" in rows[2]["error"]


def test_popularity_buckets_by_hand():
    # position:       0  1  2  3  4     counts -> buckets: bounds 0, 1, 2, 4, 8, 16
    counts = [0, 1, 5, 9, 2]  # buckets 0, 1, 4, 5, 2
    stats = {str(10 + p): {"name": str(p), "train_mentions": c, "source_mentions": None}
             for p, c in enumerate(counts)}
    catalog = Catalog.build([10, 11, 12, 13, 14], stats, LongTailConfig(), "hand")
    ranks = np.array([[0, 1, 2], [2, 3, 4], [2, 1, 0], [2, 3, -1]])  # -1: not a catalog item
    labels = np.array([1, 4, 0, -1])  # the last target is outside the catalog
    data = RankData(ranks, labels, np.full(4, 3), catalog)
    hist = popularity_histogram(data, ks=[1, 3, 5])
    assert hist["upper_bounds"] == [0, 1, 2, 4, 8, 16]
    assert hist["labels"] == ["0", "1", "2", "3-4", "5-8", "9-16"]
    assert hist["catalog_items"] == [1, 1, 1, 0, 1, 1]
    assert hist["targets"] == [1, 1, 1, 0, 0, 0]
    # top-1: items 0, 2, 2, 2; top-3: item 0 x2, 1 x2, 2 x4, 3 x2, 4 x1 (the -1 left out)
    assert hist["recommended"] == {"1": [1, 0, 0, 0, 3, 0], "3": [2, 2, 1, 0, 4, 2]}
    assert bucket_of(np.array([0, 1, 2, 3, 4, 5, 8, 9, 16, 17]), bucket_bounds(17)).tolist() == \
        [0, 1, 2, 3, 3, 4, 4, 5, 5, 6]
    assert bucket_labels(bucket_bounds(0)) == ["0", "1"]


def test_evaluator_report_carries_the_histogram():
    from lotcrs_plugin.evaluator.longtail import LongTailEvaluator

    stats = {str(10 + p): {"name": str(p), "train_mentions": c, "source_mentions": None}
             for p, c in enumerate([0, 3, 3, 12])}
    config = LongTailConfig(ks=(1, 2))
    ev = LongTailEvaluator(Catalog.build([10, 11, 12, 13], stats, config, "hand"), config)
    for ranks, label in [([3, 1], 1), ([3, 2], 0), ([1, 2], 3)]:
        ev.rec_evaluate(ranks, label)
    ev.report(mode="test")
    hist = ev.last_report["popularity_buckets"]
    assert hist["labels"] == ["0", "1", "2", "3-4", "5-8", "9-16"]
    assert hist["targets"] == [1, 0, 0, 1, 0, 1]
    # top-2 entries: items 3, 1 | 3, 2 | 1, 2 -> bucket 3-4 (items 1, 2) x4, bucket 9-16 (item 3) x2
    assert hist["recommended"] == {"1": [0, 0, 0, 1, 0, 2], "2": [0, 0, 0, 4, 0, 2]}


def test_subset_table_and_csv_columns(tmp_path):
    """A run that reports the 'unmentioned' subset gets a second table with the subset's numbers;
    a run without it shows '-' there with a note; the CSV carries the subset columns."""
    import csv

    from lotcrs_plugin.compare import read_results, write_csv, write_markdown

    def result(model: str, r10: float, sub_r10: float | None) -> dict:
        longtail = {"n_samples": 10, "n_tail_samples": 4, "metrics": {"recall@10": r10},
                    "tail": {"definition": "train_mentions <= 1", "catalog_size": 50, "tail_size": 20}}
        if sub_r10 is not None:
            longtail["subsets"] = {"unmentioned": {"n_samples": 7, "n_tail_samples": 3,
                                                   "metrics": {"recall@10": sub_r10}}}
        return {"model_name": model, "dataset": "d", "test": {"longtail": longtail}, "selection": {}}

    paths = []
    for name, r in (("a", result("LOTCRS", 0.5, 0.25)), ("b", result("LOTCRS", 0.4, 0.125)),
                    ("c", result("KBRD", 0.3, None))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    rows = [read_results(p) for p in paths]
    md = tmp_path / "t.md"
    write_markdown(rows, md, title="t")
    text = md.read_text()
    main, _, sub = text.partition("## Subset 'unmentioned'")
    assert sub, text
    assert "| LOTCRS (a) | d | - | 0.5000 |" in main and "| LOTCRS (b) | d | - | 0.4000 |" in main
    assert "| LOTCRS (a) | d | - | 0.2500 |" in sub and "7 (3)" in sub
    assert "| KBRD | d | - | - |" in sub and "no 'unmentioned' subset" in sub
    write_csv(rows, tmp_path / "t.csv")
    table = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert table[1]["unmentioned:recall@10"] == "0.125" and table[2]["unmentioned:recall@10"] == ""
