"""`crslab run` end to end: CRSLab's own recommenders train and test on the synthetic dataset,
and a run writes nothing into site-packages or the current directory."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from lotcrs_plugin.runner import run

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "crslab_configs" / "baselines"
SMALL = {"n_items": 60, "n_conversations": 160, "seed": 3}


def load(name: str, **changes) -> dict:
    opt = yaml.safe_load((BASELINES / name).read_text())
    opt["synthetic"] = dict(SMALL)
    for stage in ("rec", "conv"):
        if stage in opt:
            opt[stage]["epoch"] = 1
    opt.update(changes)
    return opt


def assert_rec_metrics_in_range(metrics: dict[str, float]) -> None:
    for k in (1, 10, 50):
        for name in ("hit", "ndcg", "mrr"):
            value = metrics[f"{name}@{k}"]
            assert 0.0 <= value <= 1.0 and not math.isnan(value), (name, k, value)
    assert metrics["hit@1"] <= metrics["hit@10"] <= metrics["hit@50"]
    assert metrics["mrr@10"] <= metrics["ndcg@10"] <= metrics["hit@10"] + 1e-9


@pytest.mark.parametrize("config", ["synthetic_textcnn.yaml", "synthetic_sasrec.yaml",
                                    "synthetic_gru4rec.yaml", "synthetic_popularity.yaml"])
def test_crslab_recommenders_run(config):
    result = run(load(config))
    assert_rec_metrics_in_range(result.test["rec"])
    assert Path(result.results_file).is_file() and Path(result.log_file).is_file()
    assert_results_file_is_the_result(result)
    # one epoch, validated once: the selection hook saw it and tested it
    assert [h["epoch"] for h in result.selection["history"]] == [0] and result.selection["selected_epoch"] == 0


def assert_results_file_is_the_result(result) -> None:
    """The results file holds the test metrics the run returned and the config that ran."""
    import json

    saved = json.loads(Path(result.results_file).read_text())
    assert saved["test"] == result.test and saved["config"] == json.loads(json.dumps(result.config, default=str))
    assert saved["selection"] == json.loads(json.dumps(result.selection, default=str))


def test_kbrd_runs_rec_and_conv():
    result = run(load("synthetic_kbrd.yaml"))
    assert_rec_metrics_in_range(result.test["rec"])
    gen = result.test["gen"]
    assert 0.0 <= gen["f1"] <= 1.0
    assert_results_file_is_the_result(result)
    # both stages were tested: a rec report and a gen report in test mode
    modes = [(bool(r.get("rec")), bool(r.get("gen"))) for r in result.reports if r["mode"] == "test"]
    assert any(rec for rec, _ in modes) and any(gen for _, gen in modes)


def _tiny_bert(folder: Path, words: list[str]) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)
    BertModel(config).save_pretrained(folder)
    return folder


def test_bert_with_a_tiny_local_model(tmp_path):
    import json

    # the synthetic dataset's words make the tiny model's vocabulary, as a real one would cover them
    first = run(load("synthetic_popularity.yaml"))
    from lotcrs_plugin import paths

    token_files = list(paths.active_layout().dataset.glob("synthetic/*/token2id.json"))
    assert token_files
    words = [w for f in token_files for w in json.loads(f.read_text()) if not w.startswith("__")]
    model_dir = _tiny_bert(tmp_path / "tiny-bert", words)
    result = run(load("synthetic_bert.yaml", pretrained_path={"bert": str(model_dir)}))
    assert_rec_metrics_in_range(result.test["rec"])
    assert first.test["rec"] != result.test["rec"]


def _snapshot(folder: Path) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
            if "__pycache__" not in d}


def test_demo_run_writes_only_under_the_root(tmp_path):
    """The README's main job: nothing lands in site-packages or the current directory."""
    site = Path(sysconfig.get_paths()["purelib"])
    before = _snapshot(site)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    home = tmp_path / "home"
    env = {**os.environ, "LOTCRS_HOME": str(home)}
    exe = Path(sys.executable).parent / "crslab"
    cmd = [str(exe), "run"] if exe.exists() else [sys.executable, "-m", "lotcrs_plugin", "run"]
    # two runs (the plain backbone and LOT-CRS): about a minute of CPU, several on a busy machine
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| plain backbone | LOT-CRS |" in out.stdout and "TailCov@50" in out.stdout
    assert "of 200 items" in out.stdout
    assert list(cwd.iterdir()) == []
    assert _snapshot(site) - before == set()
    assert len(list((home / "results").glob("*.json"))) == 2 and len(list((home / "log").glob("*.log"))) == 2
    assert (home / "demo" / "demo_recall_vs_tail_coverage.png").stat().st_size > 0


def test_runs_started_in_the_same_second_keep_their_own_files(monkeypatch):
    """The default run name has one-second resolution: a second run gets its own log and results
    file instead of overwriting the first one's."""
    import lotcrs_plugin.runner as runner

    monkeypatch.setattr(runner.time, "strftime", lambda fmt, *a: "2026-01-01-00-00-00")
    first = run(load("synthetic_popularity.yaml"))
    kept = Path(first.results_file).read_text()
    second = run(load("synthetic_popularity.yaml"))
    assert Path(first.results_file).name == f"{first.dataset}_{first.model_name}_2026-01-01-00-00-00.json"
    assert second.results_file != first.results_file and second.log_file != first.log_file
    assert Path(second.results_file).name.endswith("-00-00-00-2.json")
    assert Path(first.results_file).read_text() == kept and Path(second.results_file).is_file()
    assert Path(second.log_file).stat().st_size > 0
