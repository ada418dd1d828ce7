"""The one place where CRSLab's tables are filled.

CRSLab looks its parts up in module-level dicts at call time (see CRSLAB_NOTES):
datasets and their language, dataloaders, systems (by ``model_name``), models (by each
model key) and evaluators. :func:`register_all` applies the compatibility patches, then calls
every entry point of the group ``crslab.plugins`` (this package declares its own there, so
installing a plugin is enough), then points CRSLab's paths at the user's root.

Registration is idempotent and refuses a name already bound to something else, with a message
naming both, in the manner of fairseq's ``register_model`` and Hugging Face's
``AutoModel.register(exist_ok=False)``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from lotcrs_plugin.errors import UserError

ENTRY_POINT_GROUP = "crslab.plugins"

# The plugin's own parts, as "module:attribute" so that listing them imports nothing.
# table -> {name: target}; datasets carry their language.
PLUGIN_PARTS: dict[str, dict[str, str]] = {
    "dataset": {
        "synthetic": "lotcrs_plugin.data.synthetic.dataset:SyntheticDataset",
    },
    "dataloader": {
        "RepeatPopularity": "lotcrs_plugin.model.repeat_ranker:RepeatPopularityDataLoader",
        "LOTCRSPretrain": "lotcrs_plugin.system.pretrain:LOTCRSPretrainDataLoader",
        "LOTCRS": "lotcrs_plugin.data.finetune_samples:LOTCRSDataLoader",
    },
    "model": {
        "RepeatPopularity": "lotcrs_plugin.model.repeat_ranker:RepeatPopularityModel",
        "LOTCRSPretrain": "lotcrs_plugin.model.pretrain:LOTCRSPretrainModel",
        "LOTCRS": "lotcrs_plugin.model.lotcrs:LOTCRSModel",
    },
    "system": {
        "RepeatPopularity": "lotcrs_plugin.model.repeat_ranker:RepeatPopularitySystem",
        "LOTCRSPretrain": "lotcrs_plugin.system.pretrain:LOTCRSPretrainSystem",
        "LOTCRS": "lotcrs_plugin.system.lotcrs:LOTCRSSystem",
    },
    "evaluator": {
        "longtail": "lotcrs_plugin.evaluator.longtail:LongTailEvaluator",
    },
}
# Called before the parts are registered: they install hooks the parts rely on (idempotent).
PLUGIN_INSTALLERS: tuple[str, ...] = (
    "lotcrs_plugin.evaluator:install",  # builds system-aware evaluators with their system
)
PLUGIN_DATASET_LANGUAGE: dict[str, str] = {"synthetic": "en"}

# table name -> (module, attribute) of the CRSLab dict
CRSLAB_TABLES: dict[str, tuple[str, str]] = {
    "dataset": ("crslab.data", "dataset_register_table"),
    "language": ("crslab.data", "dataset_language_map"),
    "dataloader": ("crslab.data", "dataloader_register_table"),
    "model": ("crslab.model", "Model_register_table"),
    "system": ("crslab.system", "system_register_table"),
    "evaluator": ("crslab.evaluator", "Evaluator_register_table"),
}


class RegistryError(UserError):
    """A name is already registered to something else."""


def class_registrar(table: dict[str, type], kind: str, base: type, name: str) -> Callable[[type], type]:
    """A class decorator binding ``name`` to the class in ``table`` (and setting the class's ``name``).
    It refuses a class that is not a ``base`` and a name bound to another class; the same class
    imported again (its qualified name unchanged) passes."""

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(f"{kind} '{name}': {cls!r} is not a subclass of {base.__module__}.{base.__qualname__}")
        present = table.get(name)
        if present is not None and present is not cls and present.__qualname__ != cls.__qualname__:
            raise RegistryError(f"cannot register {kind} '{name}' as {cls.__module__}.{cls.__qualname__}: the "
                                f"name is already taken by {present.__module__}.{present.__qualname__}; "
                                f"choose another name")
        cls.name = name
        table[name] = cls
        return cls

    return decorate


def import_part_modules(package: str, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Import every module of ``package`` (found in ``folder``) but those in ``skip`` and the private
    ones, so that the register decorators of the parts they define run (backbones, heads)."""
    for info in pkgutil.iter_modules([str(folder)]):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def crslab_table(table: str) -> dict:
    module, attr = CRSLAB_TABLES[table]
    return getattr(importlib.import_module(module), attr)


def _put(table: str, name: str, obj: Any) -> None:
    entries = crslab_table(table)
    present = entries.get(name)
    if present is None:
        entries[name] = obj
    elif present is not obj and present != obj:
        raise RegistryError(
            f"cannot register {table} '{name}' as {_describe(obj)}: the name is already taken by "
            f"{_describe(present)}; choose another name"
        )


def _describe(obj: Any) -> str:
    if isinstance(obj, str):
        return repr(obj)
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_dataset(name: str, cls: type, language: str = "en") -> None:
    """Add a dataset class (a crslab BaseDataset) and its language ('en' or 'zh')."""
    if language not in ("en", "zh"):
        raise RegistryError(f"dataset '{name}': language must be 'en' or 'zh', not {language!r}")
    _put("dataset", name, cls)
    _put("language", name, language)


def register_dataloader(model_name: str, cls: type) -> None:
    _put("dataloader", model_name, cls)


def register_model(name: str, cls: type) -> None:
    _put("model", name, cls)


def register_system(model_name: str, cls: type) -> None:
    _put("system", model_name, cls)


def register_evaluator(name: str, cls: type) -> None:
    _put("evaluator", name, cls)


_REGISTER_FUNCS: dict[str, Callable[[str, Any], None]] = {
    "dataloader": register_dataloader,
    "model": register_model,
    "system": register_system,
    "evaluator": register_evaluator,
}


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_builtin() -> None:
    """Register this package's own parts (the entry point of the group ``crslab.plugins``)."""
    for target in PLUGIN_INSTALLERS:
        _resolve(target)()
    for table, parts in PLUGIN_PARTS.items():
        for name, target in parts.items():
            obj = _resolve(target)
            if table == "dataset":
                register_dataset(name, obj, PLUGIN_DATASET_LANGUAGE[name])
            else:
                _REGISTER_FUNCS[table](name, obj)


def plugin_entry_points() -> list:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def imported_dataset_folders(dataset_root: Path) -> dict[str, Path]:
    """{name: folder} of the datasets `crslab import-data` wrote under ``dataset_root``."""
    if not dataset_root.is_dir():
        return {}
    return {p.name: p for p in sorted(dataset_root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "dataset.json").is_file()}


_imported: dict[str, Any] = {}  # name -> class registered from the current root's folders


def register_imported(dataset_root: Path) -> None:
    """Register every imported dataset under the root by its folder name.

    Those of a previous root are taken out first, so a process can switch roots.
    """
    import json

    from lotcrs_plugin.data.processed import dataset_class_for

    datasets, languages = crslab_table("dataset"), crslab_table("language")
    for name, cls in list(_imported.items()):
        if datasets.get(name) is cls:
            del datasets[name]
            languages.pop(name, None)
        del _imported[name]
    for name, folder in imported_dataset_folders(dataset_root).items():
        cls = dataset_class_for(name, folder)
        manifest = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        register_dataset(name, cls, manifest.get("language", "en"))
        _imported[name] = cls


def register_all(root: str | None = None) -> None:
    """Patch CRSLab, fill its tables from every installed plugin and the imported datasets
    under ``root``, and set CRSLab's paths to ``root``."""
    from lotcrs_plugin import compat, paths

    compat.apply()
    register_builtin()  # also when running from a source tree with no entry points installed
    for ep in plugin_entry_points():
        if ep.value == f"{__name__}:register_builtin":
            continue
        ep.load()()
    layout = paths.apply_to_crslab(root)
    register_imported(layout.dataset)


# ---- listing without importing torch -------------------------------------------------------

def crslab_builtin_names() -> dict[str, list[str]]:
    """The keys of CRSLab's own tables, read from its source files without importing them."""
    names: dict[str, list[str]] = {}
    for table, (module, attr) in CRSLAB_TABLES.items():
        if table == "language":
            continue
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise UserError("crslab is not installed; run: bash install.sh")
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets)):
                names[table] = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return names


def listing() -> dict[str, dict[str, list[str]]]:
    """{table: {"crslab": [...], "<plugin>": [...]}} for `crslab list`.

    CRSLab's and this plugin's names are read without importing torch; other installed plugins
    are imported and registered to learn their names.
    """
    builtin = crslab_builtin_names()
    result: dict[str, dict[str, list[str]]] = {
        table: {"crslab": sorted(builtin.get(table, []))} for table in PLUGIN_PARTS
    }
    for table, parts in PLUGIN_PARTS.items():
        result[table]["lotcrs_plugin"] = sorted(parts)
    from lotcrs_plugin.paths import active_layout

    layout = active_layout()
    result["dataset"][f"imported ({layout.dataset})"] = sorted(imported_dataset_folders(layout.dataset))
    others = [ep for ep in plugin_entry_points() if ep.value != f"{__name__}:register_builtin"]
    if others:
        register_all()
        for table in PLUGIN_PARTS:
            known = {name for names in result[table].values() for name in names}
            extra = sorted(set(crslab_table(table)) - known)
            if extra:
                result[table]["other plugins"] = extra
    return result
