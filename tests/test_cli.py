"""The `crslab` command: help, version, list, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lotcrs_plugin import __version__

BIN = Path(sys.executable).parent


def crslab(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = BIN / "crslab"
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "lotcrs_plugin", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_version_and_help_do_not_import_torch():
    out = crslab("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; from lotcrs_plugin.cli import build_parser; build_parser().format_help(); "
         "print('torch' in sys.modules, 'crslab' in sys.modules)"],
        capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False"]
    out = crslab("--help")
    assert out.returncode == 0
    for command in ("run", "list"):
        assert command in out.stdout


def test_list_names_crslab_and_plugin_parts():
    out = crslab("list", "--json")
    assert out.returncode == 0, out.stderr
    import json

    tables = json.loads(out.stdout)
    assert "ReDial" in tables["dataset"]["crslab"]
    assert "synthetic" in tables["dataset"]["lotcrs_plugin"]
    assert {"KBRD", "TextCNN", "BERT", "SASREC"} <= set(tables["model"]["crslab"])
    assert "rec" in tables["evaluator"]["crslab"]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


BASE = "dataset: synthetic\ntokenize: {rec: nltk}\nrec_model: TextCNN\nevaluator: rec\n"


@pytest.mark.parametrize("body, expected", [
    (BASE + "embeding_dim: 3\n", ["unknown key 'embeding_dim'", "did you mean 'embedding_dim'", "known keys:"]),
    (BASE + "rec:\n  epohc: 2\n", ["block 'rec'", "unknown key 'epohc'"]),
    (BASE + "seed: many\n", ["key 'seed' must be an integer"]),
    ("dataset: synthetic\ntokenize: {rec: nltk}\nrec_model: TextCN\n", ["unknown rec_model 'TextCN'", "did you mean 'TextCNN'", "valid:"]),
    ("dataset: Redial\ntokenize: {rec: nltk}\nrec_model: TextCNN\n", ["unknown dataset 'Redial'", "did you mean 'ReDial'"]),
    (BASE.replace("evaluator: rec", "evaluator: recc"), ["unknown evaluator 'recc'", "valid:"]),
    ("dataset: [1, 2\n", ["not valid YAML"]),
    ("tokenize: nltk\nrec_model: TextCNN\n", ["key 'dataset' is missing"]),
    ("dataset: synthetic\ntokenize: nltk\nrec_model: TextCNN\n", ["tokenization of each stage model", "tokenize: {rec: nltk}"]),
])
def test_bad_config_is_one_line_exit_2(tmp_path, body, expected):
    out = crslab("run", "--config", str(_write(tmp_path, body)), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err
    assert list(tmp_path.iterdir()) == [tmp_path / "cfg.yaml"]  # nothing written to the cwd


def test_missing_config_file(tmp_path):
    out = crslab("run", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "nope.yaml' not found" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    out = crslab("run", "--debug", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode != 0 and "Traceback" in out.stderr
