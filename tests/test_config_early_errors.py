"""Every check that needs no data runs before any data is loaded: each bad value is one line naming
the key, the value and what would be right, within 2 s, on a dataset whose loading would fail."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lotcrs_plugin import config as run_config
from lotcrs_plugin.errors import UserError
from lotcrs_plugin.runner import run

BROKEN = "broken_data"  # a dataset folder whose train_data.json is not JSON
LOAD_ERROR = "train_data.json: line 1"
GOOD = {"dataset": BROKEN, "model": "LOTCRS", "backbone": "bert", "backbone_path": "builtin:tiny-bert",
        "evaluator": "longtail"}  # no tokenize: LOT-CRS re-tokenizes with its backbone


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory) -> Path:
    """A root holding one imported dataset whose folder passes the cheap check at registration
    (every file present, dataset.json valid) but whose loading fails."""
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.generator import generate

    root = tmp_path_factory.mktemp("broken_root")
    folder = generate(SyntheticConfig(n_items=60, n_conversations=40, seed=5), root / "data" / "dataset" / BROKEN)
    (folder / "train_data.json").write_text('[{"conv_id": ', encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def warm(broken_root) -> Path:
    """Imports and registration done once, so the 2 s below time the checks, not Python's imports."""
    from lotcrs_plugin.registry import register_all

    register_all(str(broken_root))
    run_config.validate(dict(GOOD))
    run_config.check_backbone(dict(GOOD))
    return broken_root


def test_the_good_config_does_reach_the_data_and_fails_there(warm):
    """The control: with nothing wrong in the config, the run loads the dataset (without a
    `tokenize:` key) and that load fails; so a check done after loading would show below."""
    with pytest.raises(UserError, match=LOAD_ERROR):
        run(dict(GOOD), output_root=str(warm))


CASES = [
    ({"backbone": "bret"}, ["key 'backbone'", "unknown backbone 'bret'", "did you mean 'bert'", "valid: bart, bert, unicrs"]),
    ({"backbone": None}, ["key 'backbone' is missing", "bart, bert, unicrs"]),
    ({"backbone_path": None}, ["key 'backbone_path' is missing", "builtin:tiny-bert"]),
    ({"backbone_path": "/no/such/model-folder"}, ["key 'backbone_path'", "no folder '/no/such/model-folder'",
                                                  "existing model folder or a Hugging Face name"]),
    ({"backbone_path": "~/no-such-folder-here"}, ["no folder '~/no-such-folder-here'"]),
    ({"backbone_path": "./models/minilm"}, ["no folder './models/minilm'"]),
    ({"backbone_path": "has spaces/not a hub name"}, ["no folder 'has spaces/not a hub name'"]),
    ({"backbone_path": {"text_encoder": "roberta-base", "decoder": "/no/decoder"}, "backbone": "unicrs"},
     ["key 'backbone_path.decoder'", "no folder '/no/decoder'"]),
    ({"backbone_path": "builtin:tiny-bret"}, ["unknown built-in backbone 'builtin:tiny-bret'", "valid: builtin:tiny-bert"]),
    ({"backbone": "bart"}, ["builtin:tiny-bert is a 'bert' backbone", "set backbone: bert"]),
    ({"model": "LOTCRSS"}, ["key 'tokenize' is missing", "did you mean model: LOTCRS"]),
    ({"model": "LOTCRSS", "tokenize": "nltk"}, ["unknown model 'LOTCRSS'", "did you mean 'LOTCRS'", "valid:"]),
    ({"dataset": "broken_dat"}, ["unknown dataset 'broken_dat'", f"did you mean '{BROKEN}'", "valid:"]),
    ({"evaluator": "longtale"}, ["unknown evaluator 'longtale'", "valid:"]),
    ({"seed": "x"}, ["key 'seed' must be an integer, not 'x'"]),
    ({"backbone_path": 3}, ["key 'backbone_path' must be a string or a mapping, not 3"]),
    ({"lotcrs": {"epochs": "two"}}, ["block 'lotcrs': key 'epochs' must be an integer, not 'two'"]),
    ({"lotcrs": {"epoch": 2}}, ["block 'lotcrs': unknown key 'epoch'", "known keys:", "did you mean 'epochs'"]),
    ({"retrieval": {"top_k": 1.5}}, ["block 'retrieval'", "top_k", "1.5"]),
    ({"smoothing": {"teacher": "teachr"}}, ["block 'smoothing'", "teacher", "teachr"]),
    ({"lotcrs_pretrain": {"mlm_probability": "high"}}, ["block 'lotcrs_pretrain'", "mlm_probability", "'high'"]),
    ({"selection": "hit@1"}, ["key 'selection' must be a mapping, not 'hit@1'"]),
    ({"rerank": {"tail_slots_keep": {"recal@50": 0.05}}}, ["block 'rerank'", "'recal@50' is not a metric"]),
    ({"rerank": {"tail_slots_keep": {"recall@50": 5}}}, ["block 'rerank'", "in [0, 1)"]),
    ({"rerank": {"tail_slots_metric": "tail_cov@50"}}, ["block 'rerank'", "'tail_cov@50' is not a metric"]),
    ({"rec": {"optimizer": {"name": "Adamm"}}}, ["block 'rec': unknown optimizer 'Adamm'", "valid:"]),
]


def _without_none(change: dict) -> dict:
    opt = {**GOOD, **change}
    return {k: v for k, v in opt.items() if v is not None}


def _assert_early(opt: dict, root: Path, fragments: list[str]) -> None:
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        run(opt, output_root=str(root))
    seconds = time.perf_counter() - started
    message = str(err.value)
    assert LOAD_ERROR not in message, message  # reported before the dataset was loaded
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert seconds < 2.0, (seconds, message)


@pytest.mark.parametrize("change, fragments", CASES, ids=[str(c) for c, _ in CASES])
def test_a_bad_value_is_reported_before_any_data_is_loaded(warm, change, fragments):
    _assert_early(_without_none(change), warm, fragments)


@pytest.mark.parametrize("block", sorted(run_config.CONFIG_BLOCKS))
def test_every_config_block_refuses_an_unknown_key_before_loading(warm, block):
    _assert_early({**GOOD, block: {"no_such_key_here": 1}}, warm,
                  [f"block '{block}'", "unknown key", "no_such_key_here", "known keys"])


def test_a_pretrained_export_of_another_backbone_and_a_file_as_folder(warm, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "lotcrs_backbone.json").write_text('{"format": "lotcrs-backbone", "backbone": "bart"}')
    _assert_early({**GOOD, "backbone_path": str(export)}, warm,
                  [f"{export} holds a 'bart' backbone", "set backbone: bart"])
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    _assert_early({**GOOD, "backbone_path": str(a_file)}, warm, ["is a file, not a model folder"])


def test_a_hub_name_or_an_existing_folder_passes_the_check(tmp_path):
    for path in ("google-bert/bert-base-uncased", "roberta-base", "microsoft/DialoGPT-small", str(tmp_path),
                 "builtin:tiny-bert"):
        run_config.check_backbone({**GOOD, "backbone_path": path})
    run_config.check_backbone({**GOOD, "backbone": "unicrs",
                               "backbone_path": {"text_encoder": "roberta-base", "decoder": str(tmp_path)}})
    run_config.check_backbone({"model": "TextCNN"})  # CRSLab's models have no backbone


def test_plugin_models_need_no_tokenize():
    for model in ("LOTCRS", "LOTCRSPretrain"):
        opt = run_config.validate({"dataset": "synthetic", "model": model, "backbone": "bert",
                                   "backbone_path": "builtin:tiny-bert"})
        assert opt["tokenize"] == "nltk"
    assert run_config.validate({**GOOD, "tokenize": {"rec": "nltk"}})["tokenize"] == {"rec": "nltk"}
    with pytest.raises(UserError, match="key 'tokenize' is missing"):
        run_config.validate({"dataset": "synthetic", "model": "KBRD"})


def test_the_command_prints_one_line_and_exits_2_without_loading(broken_root, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"dataset: {BROKEN}\nmodel: LOTCRS\nbackbone: bret\nbackbone_path: builtin:tiny-bert\n")
    out = subprocess.run([sys.executable, "-m", "lotcrs_plugin.cli", "run", "--config", str(config),
                          "--output-root", str(broken_root)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"crslab run: error: {config}: key 'backbone': unknown backbone 'bret' "
                                  f"(did you mean 'bert'?); valid: bart, bert, unicrs")
    assert "data load" not in out.stdout + out.stderr


def test_a_bad_value_from_set_is_reported_early_naming_the_override(warm, tmp_path):
    config = tmp_path / "good.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in GOOD.items()))
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        run(str(config), overrides=["backbone=bret"], output_root=str(warm))
    assert time.perf_counter() - started < 2.0
    assert str(err.value).startswith(f"{config} with --set backbone=bret: key 'backbone': unknown backbone 'bret'")
