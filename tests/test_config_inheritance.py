"""Config files: `base:` inheritance (merge, chains, cycles, relative paths, !unset), `--set`
overrides validated like the file, `--print-config`, and what a run records of them."""

from __future__ import annotations

import io
import json
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from lotcrs_plugin import config as run_config
from lotcrs_plugin.cli import main as cli_main
from lotcrs_plugin.config_files import apply_override, merge, parse_override, read_config
from lotcrs_plugin.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


BASE = """\
    dataset: synthetic
    tokenize: {rec: nltk}
    rec_model: TextCNN
    evaluator: rec
    synthetic: {n_items: 60, n_conversations: 160, seed: 3}
    rec:
      epoch: 1
      batch_size: 32
      optimizer: {name: Adam, lr: 0.001}
    lotcrs:
      epochs: 4
      prompt: "you should watch [MASK]"
    rerank:
      knn_grid: [0, 0.5, 1]
      tail_slots_grid: {10: [0, 1], 50: [0, 10]}
"""


def test_keys_merge_over_the_base_block_by_block(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", """\
        base: base.yaml
        seed: 7
        rec:
          optimizer: {lr: 0.01}      # merged into the base's optimizer, its name kept
        rerank:
          knn_grid: [2]              # a list replaces the base's list
          tail_slots_grid: {10: [3]}
        backbone_path: {text_encoder: roberta-base, decoder: gpt2}
    """)
    got = read_config(child)
    opt = got.opt
    assert got.files == [str(child), str(tmp_path / "base.yaml")]
    assert "base" not in opt
    assert opt["seed"] == 7 and opt["dataset"] == "synthetic"
    assert opt["rec"] == {"epoch": 1, "batch_size": 32, "optimizer": {"name": "Adam", "lr": 0.01}}
    assert opt["rerank"] == {"knn_grid": [2], "tail_slots_grid": {10: [3], 50: [0, 10]}}
    assert opt["lotcrs"] == {"epochs": 4, "prompt": "you should watch [MASK]"}
    assert list(opt)[:4] == ["dataset", "tokenize", "rec_model", "evaluator"]  # the base's order, new keys after
    # a mapping over a scalar replaces it, and the reverse
    assert merge({"p": "folder"}, {"p": {"a": 1}}) == {"p": {"a": 1}}
    assert merge({"p": {"a": 1}}, {"p": "folder"}) == {"p": "folder"}


def test_a_chain_of_bases_in_other_folders_each_relative_to_its_file(tmp_path):
    write(tmp_path / "configs" / "main.yaml", BASE)
    write(tmp_path / "configs" / "cpu" / "small.yaml", "base: ../main.yaml\nlotcrs: {epochs: 2}\nseed: 1\n")
    leaf = write(tmp_path / "configs" / "cpu" / "ablations" / "no_x.yaml",
                 "base: ../small.yaml   # the CPU variant\nlotcrs: {prompt: '[MASK]'}\n")
    got = read_config(leaf)
    assert [Path(f).name for f in got.files] == ["no_x.yaml", "small.yaml", "main.yaml"]
    assert got.opt["lotcrs"] == {"epochs": 2, "prompt": "[MASK]"} and got.opt["seed"] == 1
    assert got.opt["rec"]["batch_size"] == 32
    # the same chain validated, from another current folder than the files'
    loaded = run_config.load(str(leaf))
    assert loaded.opt["lotcrs"]["epochs"] == 2 and "merged over" in loaded.describe()


def test_a_cycle_is_refused_with_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "base: sub/b.yaml\nseed: 1\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\n")
    with pytest.raises(UserError) as err:
        read_config(a)
    message = str(err.value)
    assert "cycle" in message and len(message.splitlines()) == 1
    assert f"{a} -> {tmp_path / 'sub' / 'b.yaml'} -> {a}" in message
    itself = write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(UserError, match="self.yaml -> .*self.yaml is a cycle"):
        read_config(itself)


def test_a_missing_or_malformed_base_is_one_line_naming_the_file(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nope.yaml\nseed: 1\n")
    with pytest.raises(UserError, match=r"child.yaml: base 'nope.yaml' not found \(looked for .*nope.yaml\)"):
        read_config(child)
    write(tmp_path / "child.yaml", "base: [a.yaml]\n")
    with pytest.raises(UserError, match="key 'base' must be the path of another YAML config"):
        read_config(child)
    write(tmp_path / "bad.yaml", "seed: [1\n")
    write(tmp_path / "child.yaml", "base: bad.yaml\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        read_config(child)


def test_unset_removes_a_base_key_and_refuses_one_the_base_lacks(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "base: base.yaml\nrerank:\n  knn_grid: !unset\nlotcrs: !unset\n")
    opt = read_config(child).opt
    assert opt["rerank"] == {"tail_slots_grid": {10: [0, 1], 50: [0, 10]}} and "lotcrs" not in opt
    write(tmp_path / "child.yaml", "base: base.yaml\nrerank:\n  knn_gird: !unset\n")
    with pytest.raises(UserError, match="key 'rerank.knn_gird' is !unset, but the base does not set it"):
        read_config(child)
    write(tmp_path / "child.yaml", "base: base.yaml\nseed: !unset 3\n")
    with pytest.raises(UserError, match="!unset takes no value"):
        read_config(child)


def test_an_unknown_key_in_an_override_is_refused_with_the_known_keys(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "base: base.yaml\nlotcrs: {epoch: 3}\n")
    with pytest.raises(UserError) as err:
        run_config.load(str(child))
    message = str(err.value)
    assert message.startswith(f"{child}: block 'lotcrs': unknown key 'epoch'; known keys: ")
    assert "epochs" in message and "did you mean 'epochs'" in message
    write(tmp_path / "child.yaml", "base: base.yaml\nembeding_dim: 3\n")
    with pytest.raises(UserError, match="unknown key 'embeding_dim' .did you mean 'embedding_dim'.*known keys:"):
        run_config.load(str(child))


def test_set_values_are_yaml_and_checked_like_the_file(tmp_path):
    path = write(tmp_path / "base.yaml", BASE)
    assert parse_override("lotcrs.epochs=5") == (["lotcrs", "epochs"], 5)
    assert parse_override("seed=7")[1] == 7 and parse_override("x=1e-4")[1] == 0.0001
    assert parse_override("selection.metric=recall@10+tail_coverage@10")[1] == "recall@10+tail_coverage@10"
    assert parse_override("rerank.knn_grid=[0, 1]")[1] == [0, 1] and parse_override("a=null")[1] is None

    loaded = run_config.load(str(path), ["lotcrs.epochs=5", "seed=7", "rec.optimizer.lr=1e-4",
                                         "rerank.tail_slots_grid.10=[2]", "smoothing.beta=0.5"])
    opt = loaded.opt
    assert opt["lotcrs"] == {"epochs": 5, "prompt": "you should watch [MASK]"} and opt["seed"] == 7
    assert opt["rec"]["optimizer"] == {"name": "Adam", "lr": 0.0001}
    assert opt["rerank"]["tail_slots_grid"] == {10: [2], 50: [0, 10]}  # '10' reaches the integer key
    assert opt["smoothing"] == {"beta": 0.5}  # a block the file does not set
    assert loaded.overrides[0] == "lotcrs.epochs=5"
    with open(path, encoding="utf-8") as f:  # the file itself is not changed
        assert yaml.safe_load(f)["lotcrs"]["epochs"] == 4

    for expr, expected in [
        ("lotcrs.epochs=five", "--set lotcrs.epochs=five: block 'lotcrs': key 'epochs' must be an integer, not 'five'"),
        ("seed=1.5", "--set seed=1.5: key 'seed' must be an integer, not 1.5"),
        ("lotcrs.epoch=5", "--set lotcrs.epoch=5: block 'lotcrs': unknown key 'epoch'; known keys: "),
        ("seeed=3", "--set seeed=3: unknown key 'seeed' (did you mean 'seed'?); known keys: "),
        ("smoothing.teacher=teachr", "--set smoothing.teacher=teachr: block 'smoothing'"),
        ("dataset.name=x", "--set dataset.name=x: 'dataset' is 'synthetic', not a block of keys"),
        ("lotcrs.epochs", "--set 'lotcrs.epochs': write KEY=VALUE"),
        ("base=other.yaml", "'base' is read from the config files only"),
        ("seed=[1", "--set seed=[1: the value is not valid YAML"),
    ]:
        with pytest.raises(UserError) as err:
            run_config.load(str(path), [expr])
        assert str(err.value).startswith(expected) if expected.startswith("--set") else expected in str(err.value), \
            (expr, str(err.value))
        assert len(str(err.value).splitlines()) == 1
    # an error of the file itself names the file, not the override
    bad = write(tmp_path / "bad.yaml", "base: base.yaml\nseed: many\n")
    with pytest.raises(UserError, match=f"^{bad}: key 'seed' must be an integer"):
        run_config.load(str(bad), ["lotcrs.epochs=5"])
    assert apply_override({"a": {"b": 1}}, "a.b=!unset") == {"a": {}}


def print_config(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(["run", *argv, "--print-config"])
    return code, out.getvalue()


def test_print_config_shows_the_merged_config_and_loads_no_data(tmp_path, monkeypatch):
    write(tmp_path / "base.yaml", BASE.replace("dataset: synthetic", "dataset: not_imported_anywhere"))
    child = write(tmp_path / "child.yaml", "base: base.yaml\nrec: {epoch: 3}\n")
    monkeypatch.chdir(tmp_path)
    code, text = print_config("--config", "child.yaml", "--set", "lotcrs.epochs=9", "--seed", "5")
    assert code == 0
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header == ["# child.yaml", f"#   over base {Path('base.yaml')}", "#   --set lotcrs.epochs=9", "#   --seed 5"]
    printed = yaml.safe_load(text)
    expected = run_config.load(str(child), ["lotcrs.epochs=9"]).opt
    assert printed == {**expected, "seed": 5}
    assert printed["rec"]["epoch"] == 3 and printed["rec"]["batch_size"] == 32 and printed["lotcrs"]["epochs"] == 9
    assert "knn_grid: [0, 0.5, 1]" in text  # lists of plain values stay on one line, as in the files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "child.yaml"]  # nothing written
    assert cli_main(["run", "--config", "child.yaml", "--set", "lotcrs.epochs=x", "--print-config"]) == 2


def test_torchrun_processes_get_the_same_overrides():
    import argparse

    from lotcrs_plugin.commands import run as run_command

    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    args = parser.parse_args(["--config", "x.yaml", "--nproc", "2", "--set", "lotcrs.epochs=5", "--set", "seed=7"])
    args.debug = False
    cmd = run_command.launch_command(args)
    assert cmd[cmd.index("--set") + 1] == "lotcrs.epochs=5" and cmd[-cmd[::-1].index("--set")] == "seed=7"


def test_a_run_records_the_merged_config_and_logs_its_files(tmp_path):
    from lotcrs_plugin.runner import run

    shipped = REPO / "crslab_configs" / "baselines" / "synthetic_textcnn.yaml"
    small = write(tmp_path / "small.yaml", f"""\
        base: {shipped}   # an absolute path
        synthetic: {{n_items: 60, n_conversations: 160, seed: 3}}
        rec: {{epoch: 1}}
    """)
    child = write(tmp_path / "sub" / "child.yaml", "base: ../small.yaml\nrec: {batch_size: 16}\nlog_name: inherit_test\n")
    result = run(str(child), overrides=["seed=11"])
    saved = json.loads(Path(result.results_file).read_text(encoding="utf-8"))
    assert saved["test"]["rec"]["hit@50"] >= 0
    rec = saved["config"]["rec"]
    assert rec["epoch"] == 1 and rec["batch_size"] == 16 and rec["optimizer"] == {"name": "Adam", "lr": 0.001}
    assert saved["config"]["seed"] == 11 and saved["config"]["synthetic"]["n_items"] == 60
    assert saved["config"]["filter_sizes"] == "(2, 3, 4)"  # from the shipped file, two bases down
    assert saved["config_files"] == [str(child), str(tmp_path / "small.yaml"), str(shipped)]
    assert saved["overrides"] == ["seed=11"]
    log = Path(result.log_file).read_text(encoding="utf-8")
    assert f"config {child} (merged over {tmp_path / 'small.yaml'} <- {shipped}) with --set seed=11" in log


def test_simulate_and_compare_read_the_base(tmp_path, capsys):
    from lotcrs_plugin.compare import _cache_file

    write(tmp_path / "base.yaml", textwrap.dedent(BASE) + "simulation: {per_item: -1}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nseed: 3\n")
    # simulate takes its simulation block from the base (whose per_item is refused)
    code = cli_main(["simulate", "--config", str(child), "--dataset-dir", str(tmp_path), "--quiet"])
    assert code == 2 and "per_item" in capsys.readouterr().err
    # compare keys its cache by the merged config: a change to the base is a new run
    before = _cache_file(tmp_path, child, run_config.read_yaml(child), None)
    write(tmp_path / "base.yaml", textwrap.dedent(BASE) + "simulation: {per_item: 2}\n")
    assert _cache_file(tmp_path, child, run_config.read_yaml(child), None) != before


def test_every_shipped_config_loads_with_its_bases(home_with_config_models):
    from support import shipped_configs

    files = shipped_configs()
    assert len(files) > 40
    for path in files:
        loaded = run_config.load(str(path))
        assert loaded.opt.get("dataset"), path
        if path.parent.name.endswith("_ablations") or path.stem.endswith("_cpu") or "_samples_" in path.stem:
            assert len(loaded.files) > 1, f"{path} should name its base and the keys it changes"
