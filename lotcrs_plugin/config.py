"""Run configuration: a CRSLab YAML plus the plugin's keys, validated on load.

Known keys are, in one place: the plugin's own top-level keys (:data:`PLUGIN_KEYS`, with their
types and defaults), the component blocks (:data:`CONFIG_BLOCKS`, each a dataclass with
``from_dict``), and the keys CRSLab's own code reads, harvested from its installed source
(``opt['key']`` / ``opt.get('key')``), so a typo is caught for CRSLab's models too. An unknown
key, a wrong type, an unknown dataset, model or evaluator name raises :class:`UserError` with
one line naming the key and the valid choices.

A config file may name a ``base:`` and ``--set`` may change keys after the files
(:mod:`lotcrs_plugin.config_files`); :func:`load` merges and validates them. :func:`check_backbone`
checks the backbone name and path of the models that need one, before any data is loaded.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lotcrs_plugin.config_files import apply_override, read_config, resolve_bases
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

# The plugin's models that read `backbone` and `backbone_path` and re-tokenize every dialog with the
# backbone's tokenizer. CRSLab still processes the dataset once (its vocabulary feeds the built-in
# tiny backbones); its word tokens (nltk) are the processing every dataset of the plugin has.
BACKBONE_MODELS: tuple[str, ...] = ("LOTCRS", "LOTCRSPretrain")
# model -> the top-level defaults that model adds (after PLUGIN_KEYS' defaults)
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {name: {"tokenize": "nltk"} for name in BACKBONE_MODELS}

# block key -> "module:Dataclass" with a classmethod from_dict(dict) that validates the block.
CONFIG_BLOCKS: dict[str, str] = {
    "synthetic": "lotcrs_plugin.data.synthetic.config:SyntheticConfig",
    "longtail": "lotcrs_plugin.evaluator.config:LongTailConfig",
    "simulation": "lotcrs_plugin.data.simulator:SimulationConfig",
    "retrieval": "lotcrs_plugin.config_blocks.retrieval:RetrievalConfig",
    "rerank": "lotcrs_plugin.config_blocks.rerank:RerankConfig",
    "smoothing": "lotcrs_plugin.model.smoothing:SmoothingConfig",
    "head": "lotcrs_plugin.model.heads:HeadConfig",
    "evidence": "lotcrs_plugin.model.evidence:EvidenceConfig",
    "lotcrs_pretrain": "lotcrs_plugin.config_blocks.pretrain:PretrainConfig",
    "lotcrs": "lotcrs_plugin.config_blocks.finetune:FinetuneConfig",
    "selection": "lotcrs_plugin.system.selection:SelectionConfig",
    "distributed": "lotcrs_plugin.system.distributed:DistributedConfig",
    "conversation": "lotcrs_plugin.model.conversation.config:ConversationConfig",
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
    """The mapping of a YAML config merged over its ``base:`` chain (config_files), or UserError
    naming the file (and line) that is wrong."""
    return read_config(path).opt


@dataclass
class LoadedConfig:
    """A validated config (``opt``, with the defaults) and where it came from: ``source`` (the
    file, or '<dict>'), ``files`` (the file, then its bases) and the ``--set`` overrides."""

    opt: dict
    source: str
    files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the log: the file, the bases merged under it and the overrides."""
        text = self.source
        if len(self.files) > 1:
            text += " (merged over " + " <- ".join(self.files[1:]) + ")"
        if self.overrides:
            text += " with " + " ".join(f"--set {o}" for o in self.overrides)
        return text


def load(config: str | os.PathLike | dict, overrides: Sequence[str] = ()) -> LoadedConfig:
    """A config file (or mapping; its ``base:`` relative to the current folder) merged over its
    bases, then each ``--set`` applied, validated like a file: the files first (errors name the
    file), then after each override (errors name the override)."""
    if isinstance(config, dict):
        source = "<dict>"
        files = resolve_bases(config, source, Path.cwd())
    else:
        source = str(config)
        files = read_config(config)
    opt = files.opt
    if overrides:
        check_keys_and_types(opt, source)
        for expr in overrides:
            opt = apply_override(opt, expr)
            check_keys_and_types(opt, f"--set {expr}")
    return LoadedConfig(validate(opt, where=source), source, files.files, list(overrides))


def check_keys_and_types(opt: dict, where: str = "config") -> None:
    """Every key known and of its type, in the top level, the stage blocks, ``tokenize`` and every
    block of CONFIG_BLOCKS (a part of a config, e.g. before ``--set`` overrides, passes too)."""
    known = known_keys()
    _check_keys(opt, where, known)
    for key, (types, _) in PLUGIN_KEYS.items():
        _check_type(key, opt.get(key), types, where)
    for stage in STAGES:
        block = opt.get(stage)
        if isinstance(block, dict):
            _check_keys(block, f"{where}: block '{stage}'", known)
    if isinstance(opt.get("tokenize"), dict):
        _check_keys(opt["tokenize"], f"{where}: block 'tokenize'", ["rec", "conv", "policy"])
    for key, target in CONFIG_BLOCKS.items():
        if key in opt:
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            if not isinstance(opt[key], dict):
                raise UserError(f"{where}: key '{key}' must be a mapping, not {opt[key]!r}")
            try:
                cls.from_dict(opt[key])
            except UserError as err:
                raise UserError(f"{where}: block '{key}': {err}") from None


def validate(opt: dict, where: str = "config") -> dict:
    """Check keys, types and component blocks; return a new dict with the plugin's defaults."""
    check_keys_and_types(opt, where)
    if "dataset" not in opt:
        raise UserError(f"{where}: key 'dataset' is missing; name a dataset (see `crslab list`)")
    if not any(opt.get(k) for k in MODEL_KEYS):
        raise UserError(f"{where}: no model given; set 'model' (or rec_model/conv_model/policy_model)")
    model_defaults = MODEL_DEFAULTS.get(opt.get("model"), {})
    if "tokenize" not in opt and "tokenize" not in model_defaults:
        close = difflib.get_close_matches(str(opt.get("model")), list(MODEL_DEFAULTS), n=1)
        hint = f"; or did you mean model: {close[0]}?" if close else ""
        raise UserError(f"{where}: key 'tokenize' is missing (e.g. tokenize: nltk; the models "
                        f"{', '.join(MODEL_DEFAULTS)} need none){hint}")
    tokenize = opt.get("tokenize", model_defaults.get("tokenize"))
    if not opt.get("model"):
        # CRSLab's split systems read vocab[stage] for each stage model: tokenize must name each
        stages = [k.split("_")[0] for k in MODEL_KEYS[1:] if opt.get(k)]
        missing = [s for s in stages if not isinstance(tokenize, dict) or s not in tokenize]
        if missing:
            example = ", ".join(f"{s}: {tokenize if isinstance(tokenize, str) else 'nltk'}" for s in stages)
            raise UserError(f"{where}: key 'tokenize' must name the tokenization of each stage model "
                            f"(missing: {', '.join(missing)}); e.g. tokenize: {{{example}}}")
    result = dict(opt)  # the file's order; the defaults it leaves out follow
    for key, value in [*((k, d) for k, (_, d) in PLUGIN_KEYS.items() if d is not None), *model_defaults.items()]:
        result.setdefault(key, value)
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


BUILTIN_PREFIX = "builtin:"  # backbone_path: builtin:<spec>, a tiny backbone made from the dataset's words
# a Hugging Face model id: org/name, or a legacy name without an org (roberta-base)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_EXAMPLE = "a Hugging Face name like google-bert/bert-base-uncased"


def check_backbone(opt: dict, where: str = "config") -> None:
    """For the models that need one (BACKBONE_MODELS): ``backbone`` is a known backbone and
    ``backbone_path`` an existing folder, a built-in backbone of that kind, or reads as a Hugging
    Face name (whether the hub has it is known only when it is downloaded)."""
    if opt.get("model") not in BACKBONE_MODELS:
        return
    from lotcrs_plugin.model.backbones import backbone_names  # torch, but not transformers

    names = backbone_names()
    name = opt.get("backbone")
    if not name:
        raise UserError(f"{where}: key 'backbone' is missing; model {opt['model']} needs one of: {', '.join(names)}")
    if name not in names:
        raise UserError(f"{where}: key 'backbone': unknown backbone '{name}'{_suggest(name, names)}; "
                        f"valid: {', '.join(names)}")
    path = opt.get("backbone_path")
    if not path:
        raise UserError(f"{where}: key 'backbone_path' is missing; give a local model folder, {_HUB_EXAMPLE}, "
                        f"an export of a pre-training run (<root>/save/<run>/backbone) or {BUILTIN_PREFIX}tiny-bert")
    if isinstance(path, dict):
        for part, value in path.items():
            _check_model_path(f"backbone_path.{part}", value, name, where)
    else:
        _check_model_path("backbone_path", path, name, where)


def _check_model_path(key: str, value: Any, backbone: str, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: key '{key}' must be a model folder or {_HUB_EXAMPLE}, not {value!r}")
    if value.startswith(BUILTIN_PREFIX):
        from lotcrs_plugin.model.backbones.tiny import TINY_BACKBONE

        spec = value[len(BUILTIN_PREFIX):]
        if spec not in TINY_BACKBONE:
            raise UserError(f"{where}: key '{key}': unknown built-in backbone '{value}'"
                            f"{_suggest(spec, list(TINY_BACKBONE))}; valid: "
                            f"{', '.join(BUILTIN_PREFIX + s for s in TINY_BACKBONE)}")
        if TINY_BACKBONE[spec] != backbone:
            raise UserError(f"{where}: key '{key}': {value} is a '{TINY_BACKBONE[spec]}' backbone, but the config "
                            f"says backbone: {backbone}; set backbone: {TINY_BACKBONE[spec]}")
        return
    folder = Path(os.path.expanduser(value))
    if folder.is_dir():
        _check_export(key, folder, backbone, where)
        return
    right = f"give an existing model folder or {_HUB_EXAMPLE}"
    if folder.exists():
        raise UserError(f"{where}: key '{key}': '{value}' is a file, not a model folder; {right}")
    # A name that reads as a path (absolute, ~, ./, deeper than org/name, or under an existing
    # folder) is a folder that is missing, not a hub name: say so now rather than through the hub.
    first = value.split("/", 1)[0]
    path_like = (value.startswith(("/", "~", ".")) or "\\" in value or value.count("/") > 1
                 or ("/" in value and Path(first).is_dir()))
    if path_like or not _HUB_NAME.match(value):
        raise UserError(f"{where}: key '{key}': no folder '{value}' (looked for {folder.absolute()}); {right}")


def _check_export(key: str, folder: Path, backbone: str, where: str) -> None:
    """A pre-trained export (Backbone.save_pretrained) names its backbone; it must be the config's."""
    import json

    from lotcrs_plugin.model.backbones.base import EXPORT_FILE

    meta_file = folder / EXPORT_FILE
    if not meta_file.is_file():
        return
    try:
        held = json.loads(meta_file.read_text(encoding="utf-8")).get("backbone")
    except (OSError, ValueError, AttributeError):
        return  # the backbone's loader reports a broken export with its own message
    if held and held != backbone:
        raise UserError(f"{where}: key '{key}': {folder} holds a '{held}' backbone, but the config says "
                        f"backbone: {backbone}; set backbone: {held}")


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
