"""Run configuration: a CRSLab YAML plus the plugin's keys, validated on load.

Known keys are, in one place: the plugin's own top-level keys (:data:`PLUGIN_KEYS`, with their
types and defaults), the component blocks (:data:`CONFIG_BLOCKS`, each a dataclass with
``from_dict``), and the keys CRSLab's own code reads, harvested from its installed source
(``opt['key']`` / ``opt.get('key')``), so a typo is caught for CRSLab's models too. An unknown
key, a wrong type, an unknown dataset, model or evaluator name raises :class:`UserError` with
one line naming the key and the valid choices.

The result is a real ``crslab.config.Config`` built without its side effects (CRSLab's
constructor creates ./log and removes every loguru sink of the process).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import yaml

from lotcrs_plugin.errors import UserError

STAGES = ("rec", "conv", "policy", "pretrain")
MODEL_KEYS = ("model", "rec_model", "conv_model", "policy_model")

# key -> (accepted types, default). The plugin's top-level keys; defaults live here only.
PLUGIN_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "dataset": ((str,), None),
    "tokenize": ((str, dict), None),
    "model": ((str,), None),
    "rec_model": ((str,), None),
    "conv_model": ((str,), None),
    "policy_model": ((str,), None),
    "evaluator": ((str,), "standard"),
    "output_root": ((str,), None),
    "seed": ((int,), 42),
    "pretrained_path": ((dict,), None),
    "rec": ((dict,), None),
    "conv": ((dict,), None),
    "policy": ((dict,), None),
    "pretrain": ((dict,), None),
    "epoch": ((int,), None),
    "batch_size": ((int,), None),
    "model_file": ((str,), None),
    "log_name": ((str,), None),
    "backbone": ((str,), None),            # LOT-CRS backbone: bert | bart | unicrs (see lotcrs_plugin.model.backbones)
    "backbone_path": ((str, dict), None),  # a Hugging Face name or local folder (unicrs: a mapping of parts)
}

# block key -> "module:Dataclass" with a classmethod from_dict(dict) that validates the block.
CONFIG_BLOCKS: dict[str, str] = {
    "synthetic": "lotcrs_plugin.data.synthetic:SyntheticConfig",
    "longtail": "lotcrs_plugin.evaluator.config:LongTailConfig",
    "simulation": "lotcrs_plugin.data.simulator:SimulationConfig",
    "retrieval": "lotcrs_plugin.model.retrieval:RetrievalConfig",
    "smoothing": "lotcrs_plugin.model.smoothing:SmoothingConfig",
    "lotcrs_pretrain": "lotcrs_plugin.system.pretrain:PretrainConfig",
    "lotcrs": "lotcrs_plugin.system.lotcrs:FinetuneConfig",
    "selection": "lotcrs_plugin.system.selection:SelectionConfig",
    "distributed": "lotcrs_plugin.system.distributed:DistributedConfig",
}

_OPT_KEY = re.compile(r"""(?:opt|config)(?:\[|\.get\()\s*['"]([A-Za-z_][A-Za-z_0-9]*)['"]""")


@functools.lru_cache(maxsize=1)
def crslab_known_keys() -> frozenset[str]:
    """Every key CRSLab's installed code reads from its config or a stage block."""
    spec = importlib.util.find_spec("crslab")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("crslab is not installed; run: bash install.sh")
    keys: set[str] = set()
    for folder in spec.submodule_search_locations:
        for path in Path(folder).rglob("*.py"):
            keys.update(_OPT_KEY.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(keys - {"gpu", "model_name"})


def known_keys() -> list[str]:
    return sorted(set(PLUGIN_KEYS) | set(CONFIG_BLOCKS) | crslab_known_keys())


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(mapping: dict, where: str, known: list[str]) -> None:
    for key in mapping:
        if not isinstance(key, str) or key not in known:
            raise UserError(
                f"{where}: unknown key '{key}'{_suggest(str(key), known)}; known keys: {', '.join(known)}"
            )


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join({str: "a string", dict: "a mapping", int: "an integer", float: "a number",
                        bool: "true/false", list: "a list"}[t] for t in types)


def _check_type(key: str, value: Any, types: tuple[type, ...], where: str) -> None:
    if value is None:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise UserError(f"{where}: key '{key}' must be {_type_name(types)}, not {value!r}")


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file, or UserError naming the file (and line) that is wrong."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found; give an existing YAML file with --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}{line}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys to values")
    return data


def validate(opt: dict, where: str = "config") -> dict:
    """Check keys, types and component blocks; return a new dict with the plugin's defaults."""
    known = known_keys()
    _check_keys(opt, where, known)
    for key, (types, _) in PLUGIN_KEYS.items():
        _check_type(key, opt.get(key), types, where)
    for stage in STAGES:
        block = opt.get(stage)
        if isinstance(block, dict):
            _check_keys(block, f"{where}: block '{stage}'", known)
    if "dataset" not in opt:
        raise UserError(f"{where}: key 'dataset' is missing; name a dataset (see `crslab list`)")
    if "tokenize" not in opt:
        raise UserError(f"{where}: key 'tokenize' is missing (e.g. tokenize: nltk)")
    if not any(opt.get(k) for k in MODEL_KEYS):
        raise UserError(f"{where}: no model given; set 'model' (or rec_model/conv_model/policy_model)")
    tokenize = opt["tokenize"]
    if isinstance(tokenize, dict):
        _check_keys(tokenize, f"{where}: block 'tokenize'", ["rec", "conv", "policy"])
    if not opt.get("model"):
        # CRSLab's split systems read vocab[stage] for each stage model: tokenize must name each
        stages = [k.split("_")[0] for k in MODEL_KEYS[1:] if opt.get(k)]
        missing = [s for s in stages if not isinstance(tokenize, dict) or s not in tokenize]
        if missing:
            example = ", ".join(f"{s}: {tokenize if isinstance(tokenize, str) else 'nltk'}" for s in stages)
            raise UserError(f"{where}: key 'tokenize' must name the tokenization of each stage model "
                            f"(missing: {', '.join(missing)}); e.g. tokenize: {{{example}}}")
    for key, target in CONFIG_BLOCKS.items():
        if key in opt:
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            if not isinstance(opt[key], dict):
                raise UserError(f"{where}: key '{key}' must be a mapping")
            try:
                cls.from_dict(opt[key])
            except UserError as err:
                raise UserError(f"{where}: block '{key}': {err}") from None
    result = {k: default for k, (_, default) in PLUGIN_KEYS.items() if default is not None}
    result.update(opt)
    if isinstance(result.get("pretrained_path"), dict):  # '~/models/x' means the user's home for every reader
        result["pretrained_path"] = {k: os.path.expanduser(v) if isinstance(v, str) else v
                                     for k, v in result["pretrained_path"].items()}
    return result


def check_names(opt: dict, where: str = "config") -> None:
    """Dataset, model and evaluator names must be registered (call after registration)."""
    from lotcrs_plugin.registry import crslab_table

    datasets = crslab_table("dataset")
    if opt["dataset"] not in datasets:
        raise UserError(f"{where}: unknown dataset '{opt['dataset']}'{_suggest(opt['dataset'], list(datasets))}; "
                        f"valid: {', '.join(sorted(datasets))}")
    models = crslab_table("model")
    for key in MODEL_KEYS:
        name = opt.get(key)
        if name and name not in models:
            raise UserError(f"{where}: unknown {key} '{name}'{_suggest(name, list(models))}; "
                            f"valid: {', '.join(sorted(models))}")
    name = model_name(opt)
    systems = crslab_table("system")
    if name not in systems:
        raise UserError(f"{where}: no system runs the model combination '{name}'; "
                        f"valid: {', '.join(sorted(systems))}")
    loaders = crslab_table("dataloader")
    if name not in loaders:
        raise UserError(f"{where}: no dataloader for '{name}'; valid: {', '.join(sorted(loaders))}")
    evaluators = crslab_table("evaluator")
    if opt.get("evaluator") not in evaluators:
        raise UserError(f"{where}: unknown evaluator '{opt.get('evaluator')}'; valid: {', '.join(sorted(evaluators))}")
    from crslab.system.base import lr_scheduler_class, optim_class

    for stage in STAGES:
        block = opt.get(stage) or {}
        optimizer = block.get("optimizer")
        if isinstance(optimizer, dict) and optimizer.get("name") not in optim_class:
            raise UserError(f"{where}: block '{stage}': unknown optimizer '{optimizer.get('name')}'; "
                            f"valid: {', '.join(sorted(optim_class))}")
        sched = block.get("lr_scheduler")
        if isinstance(sched, dict) and sched.get("name") not in lr_scheduler_class:
            raise UserError(f"{where}: block '{stage}': unknown lr_scheduler '{sched.get('name')}'; "
                            f"valid: {', '.join(sorted(lr_scheduler_class))}")


def model_name(opt: dict) -> str:
    """CRSLab's model_name: `model`, else rec/conv/policy models joined by '_'."""
    if opt.get("model"):
        return opt["model"]
    return "_".join(opt[k] for k in ("rec_model", "conv_model", "policy_model") if opt.get(k))


def to_crslab_config(opt: dict, gpu: str = "-1"):
    """A crslab.config.Config holding ``opt``, made without CRSLab's side effects."""
    from crslab.config.config import Config

    try:
        gpus = [int(g) for g in str(gpu).split(",")]
    except ValueError:
        raise UserError(f"--gpu must be -1 (CPU) or comma-separated GPU indices like 0 or 0,1; not {gpu!r}") from None
    # CRSLab's systems read CUDA_VISIBLE_DEVICES (its Config sets it) to know whether models are
    # wrapped in DataParallel. It then addressed devices by their physical index, which is
    # wrong once the others are hidden: the visible ones are renumbered from 0.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu) if gpus != [-1] else "-1"
    if gpus != [-1]:
        gpus = list(range(len(gpus)))
    config = Config.__new__(Config)
    config.opt = dict(opt)
    config.opt["gpu"] = gpus
    config.opt["model_name"] = model_name(opt)
    return config
