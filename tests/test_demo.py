"""The demo (`crslab run` with no --config): its synthetic data carries the signal the demo claims,
and LOT-CRS finds tail items that the plain backbone does not (a smaller version of the demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lotcrs_plugin.data.synthetic.config import SyntheticConfig
from lotcrs_plugin.data.synthetic.generator import generate

CONFIGS = Path(__file__).resolve().parents[1] / "lotcrs_plugin" / "configs"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    block = yaml.safe_load((CONFIGS / "lotcrs_demo.yaml").read_text())["synthetic"]
    return generate(SyntheticConfig.from_dict(block), tmp_path_factory.mktemp("demo") / "data")


def _load(folder: Path, name: str):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_stated_preferences_decide_the_recommendation(demo_data):
    """The seeker turn before a recommendation names a genre and a person of the recommended item;
    counted from the files (entities linked in the turn, attributes from the KG), the pair belongs
    to that item alone for most recommendations, tail items included."""
    entity2id = _load(demo_data, "entity2id.json")
    attrs = {int(k): set(v["genre"]) | set(v["star"]) | set(v["director"]) | set(v["writer"])
             for k, v in _load(demo_data, "item_attributes.json").items()}
    stats = _load(demo_data, "item_stats.json")
    tail = {int(k) for k, v in stats.items() if v["train_mentions"] <= 4}
    decided, total, tail_decided = 0, 0, 0
    for split in ("train", "valid", "test"):
        for conv in _load(demo_data, f"{split}_data.json"):
            turns = conv["dialog"]
            for before, turn in zip(turns, turns[1:]):
                if turn["role"] != "Recommender" or not turn["movies"]:
                    continue
                total += 1
                target = entity2id[turn["movies"][0]]
                stated = set(before["entity"])
                assert before["role"] == "Seeker" and len(stated) == 2 and stated <= attrs[target]
                matching = [i for i, a in attrs.items() if stated <= a]
                if matching == [target]:
                    decided += 1
                    tail_decided += target in tail
    assert total > 500 and decided / total > 0.75, (decided, total)
    assert tail_decided > 50
    meta = _load(demo_data, "dataset.json")["preferences"]
    assert meta["recommendations_after_a_preference"] == 1.0
    assert abs(meta["preferences_naming_one_item"] - decided / total) < 0.1


def test_train_targets_are_long_tailed_and_test_reaches_the_tail(demo_data):
    stats = _load(demo_data, "item_stats.json")
    rec = np.sort([v["train_rec_mentions"] for v in stats.values()])[::-1]
    assert rec[: len(rec) // 10].sum() > 0.4 * rec.sum()  # the top 10% of items get most recommendations
    tail = {int(k) for k, v in stats.items() if v["train_mentions"] <= 4}
    entity2id = _load(demo_data, "entity2id.json")
    test_targets = [entity2id[m] for conv in _load(demo_data, "test_data.json") for t in conv["dialog"]
                    if t["role"] == "Recommender" for m in t["movies"]]
    assert sum(t in tail for t in test_targets) >= 0.15 * len(test_targets)


def test_the_table_puts_the_runs_side_by_side():
    from lotcrs_plugin.compare import Row
    from lotcrs_plugin.demo import side_by_side

    def row(config: str, scale: float) -> Row:
        values = {"n_test": 100, "n_tail_test": 20, "unmentioned:n_test": 90}
        for k in (1, 10, 50):
            values.update({f"recall@{k}": scale * k / 100, f"unmentioned:recall@{k}": scale * k / 200,
                           f"tail_recall@{k}": scale * k / 400})
        values.update({"tail_coverage@10": scale * 0.1, "tail_coverage@50": scale * 0.5})
        return Row(config, values=values)

    lines = side_by_side([row("x/lotcrs_demo_plain.yaml", 1.0), row("x/lotcrs_demo.yaml", 2.0)]).splitlines()
    assert lines[0] == "| test samples | metric | plain backbone | LOT-CRS |"
    assert "| all (100) | R@10 | 0.1000 | 0.2000 |" in lines
    assert "| unmentioned (90) | R@50 | 0.2500 | 0.5000 |" in lines
    assert "| tail (20) | R@1 | 0.0025 | 0.0050 |" in lines
    assert lines[-1] == "| tail items | TailCov@50 | 0.5000 | 1.0000 |"


@pytest.mark.parametrize("flag", [["--set", "seed=1"], ["--interact"], ["--save-system"], ["--nproc", "2"]])
def test_one_run_flags_without_a_config_are_refused_before_any_run(flag, capsys):
    from lotcrs_plugin.cli import main

    assert main(["run", *flag]) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "--config" in err and "lotcrs_demo.yaml" in err


# the demo at about a third of its cost: half the catalog, fewer dialogs and epochs
SMALL = {"synthetic": {"n_items": 100, "n_conversations": 400, "seed": 1},
         "lotcrs_pretrain": {"run_name": "test_demo_pretrain"},
         "lotcrs": {"epochs": 4, "teacher_epochs": 1}}


def test_lotcrs_finds_tail_items_the_plain_backbone_misses(tmp_path):
    """A smaller demo, run as `crslab run` runs it: LOT-CRS's tail recall beats the plain model's."""
    from lotcrs_plugin.demo import DEMO_CONFIGS, run_demo

    configs = []
    for packaged in DEMO_CONFIGS:
        override = {"base": str(packaged), **SMALL}
        override["lotcrs"] = {**SMALL["lotcrs"], "run_name": f"test_{packaged.stem}"}
        path = tmp_path / packaged.name  # same file names: the table's column labels
        path.write_text(yaml.safe_dump(override), encoding="utf-8")
        configs.append(path)
    out = run_demo(configs, out=tmp_path / "out", progress=lambda line: None)
    plain, lotcrs = out.compared.rows
    assert out.table.splitlines()[0] == "| test samples | metric | plain backbone | LOT-CRS |"
    assert plain.get("n_tail_test") == lotcrs.get("n_tail_test") > 5
    assert lotcrs.get("tail_recall@50") > plain.get("tail_recall@50")
    assert lotcrs.get("tail_recall@10") + lotcrs.get("tail_recall@50") > plain.get("tail_recall@10") + plain.get("tail_recall@50")
    assert (tmp_path / "out" / "demo_recall_vs_tail_coverage.png").stat().st_size > 0
