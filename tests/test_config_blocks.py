"""Every config block (a dataclass with ``from_dict``) is validated one way
(lotcrs_plugin.config_block.typed_values): a misspelt key gets the known keys and a "did you mean",
a wrong-typed value a line naming its key, and an empty block the defaults."""

from __future__ import annotations

import ast
import importlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import lotcrs_plugin
from lotcrs_plugin.config_block import integer, number, one_of, typed_values
from lotcrs_plugin.errors import UserError

# (module, class, a misspelling, the field it misspells, a numeric field: one with a wrong-typed value)
BLOCKS = [
    ("lotcrs_plugin.config_blocks.pretrain", "PretrainConfig", "epoch", "epochs", "lr"),
    ("lotcrs_plugin.config_blocks.finetune", "FinetuneConfig", "epoch", "epochs", "lr"),
    ("lotcrs_plugin.config_blocks.rerank", "RerankConfig", "knn_tempreature", "knn_temperature", "knn_k"),
    ("lotcrs_plugin.config_blocks.retrieval", "RetrievalConfig", "topk", "top_k", "nprobe"),
    ("lotcrs_plugin.model.evidence", "EvidenceConfig", "gates", "gate", "lr"),
    ("lotcrs_plugin.model.heads.base", "HeadConfig", "init_sdt", "init_std", "init_std"),
    ("lotcrs_plugin.model.conversation.config", "ConversationConfig", "num_beam", "num_beams", "num_beams"),
    ("lotcrs_plugin.system.distributed", "DistributedConfig", "timeout_minute", "timeout_minutes", "timeout_minutes"),
    ("lotcrs_plugin.evaluator.config", "LongTailConfig", "treshold", "threshold", "threshold"),
    ("lotcrs_plugin.model.smoothing", "SmoothingConfig", "betta", "beta", "temperature"),
    ("lotcrs_plugin.data.synthetic.config", "SyntheticConfig", "n_itmes", "n_items", "turns"),
    ("lotcrs_plugin.data.simulator.config", "SimulationConfig", "per_itme", "per_item", "reason_prob"),
    # no numeric field: its flag takes the wrong-typed value
    ("lotcrs_plugin.system.selection", "SelectionConfig", "metrc", "metric", "enabled"),
]
IDS = [b[1] for b in BLOCKS]


def _block(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def _from_dict_classes() -> set[tuple[str, str]]:
    """(module, class) of every class in the package that defines ``from_dict``."""
    root = Path(lotcrs_plugin.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ".".join(("lotcrs_plugin", *path.relative_to(root).with_suffix("").parts))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(f, ast.FunctionDef) and f.name == "from_dict" for f in node.body):
                found.add((module.removesuffix(".__init__"), node.name))
    return found


def test_the_table_holds_every_block():
    assert {(b[0], b[1]) for b in BLOCKS} == _from_dict_classes()


@pytest.mark.parametrize("module, name, typo, real, _", BLOCKS, ids=IDS)
def test_a_misspelt_key_gets_the_known_keys_and_the_closest(module, name, typo, real, _):
    cls = _block(module, name)
    with pytest.raises(UserError) as err:
        cls.from_dict({typo: 1})
    message = str(err.value)
    assert f"unknown key '{typo}'" in message
    assert f"known keys: {', '.join(f.name for f in fields(cls))}" in message
    assert f"did you mean '{real}'?" in message


@pytest.mark.parametrize("module, name, _, __, key", BLOCKS, ids=IDS)
def test_a_wrong_typed_value_names_its_key(module, name, _, __, key):
    cls = _block(module, name)
    with pytest.raises(UserError) as err:
        cls.from_dict({key: "x"})
    assert f"key '{key}' must be " in str(err.value) and "not 'x'" in str(err.value)


@pytest.mark.parametrize("module, name", [b[:2] for b in BLOCKS], ids=IDS)
def test_an_empty_block_is_the_defaults(module, name):
    cls = _block(module, name)
    assert cls.from_dict({}) == cls() == cls.from_dict(None)


def test_a_block_that_is_not_a_mapping_is_one_line():
    cls = _block("lotcrs_plugin.model.smoothing", "SmoothingConfig")
    with pytest.raises(UserError, match=r"must be a mapping of keys to values, not \[1\]"):
        cls.from_dict([1])


def test_shared_checks_convert_and_refuse():
    assert number("a number >= 0 or auto", lambda v: v >= 0, also=("auto",))("w", 2) == 2.0
    assert number(also=("auto",))("w", "auto") == "auto"
    with pytest.raises(UserError, match=r"key 'w' must be a number >= 0, not True"):
        number("a number >= 0")("w", True)
    assert integer(null=True)("k", None) is None and integer()("k", np.int64(3)) == 3
    with pytest.raises(UserError, match=r"key 'k' must be an integer > 0 or null, not 0"):
        integer("an integer > 0 or null", lambda v: v > 0, null=True)("k", 0)
    with pytest.raises(UserError, match=r"key 'p' must be one of cls, mean, not 'max'"):
        one_of(("cls", "mean"))("p", "max")


def test_a_field_without_a_simple_default_needs_a_check():
    cls = _block("lotcrs_plugin.model.smoothing", "SmoothingConfig")  # top_k: int | None = None
    with pytest.raises(TypeError, match="SmoothingConfig.top_k"):
        typed_values(cls, {})
