"""The patches of CRSLab's resource folders: a build() that never deletes a folder and fails with
a UserError, and local pretrained models in place of downloads (config key ``pretrained_path``)."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lotcrs_plugin.compat.rebind import ORIGINALS, _is_patched, _mark, _module, _patch_method, _replace_everywhere
from lotcrs_plugin.errors import UserError


# ---- safe build ------------------------------------------------------------------------------

_LOCAL_RESOURCES: set[str] = set()
PLUGIN_DATASET_MARKER = "dataset.json"


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def register_local_resource(path: str | os.PathLike) -> None:
    """Mark a folder as supplied by the user: build() uses it as it is, never downloads into it."""
    _LOCAL_RESOURCES.add(_key(path))


def is_local_resource(path: str | os.PathLike) -> bool:
    return _key(path) in _LOCAL_RESOURCES


def _built_version(dpath: Path) -> str | None:
    """The version line of CRSLab's `.built` marker ('' if it has none), None without marker."""
    marker = dpath / ".built"
    if not marker.is_file():
        return None
    lines = marker.read_text(encoding="utf-8", errors="replace").split("\n")
    return lines[1] if len(lines) > 1 else ""


def _pretrain_hint(dpath: Path) -> str:
    try:
        pretrain = Path(_key(_module("crslab.config").PRETRAIN_PATH))
    except Exception:
        return ""
    if Path(_key(dpath)).parent.parent == pretrain:
        kind = Path(dpath).parent.name
        return f", or set `pretrained_path: {{{kind}: DIR}}` in the config to load a local model"
    return ""


def _download(url: str, folder: Path, file_name: str, attempts: int = 2) -> None:
    import requests

    target = folder / file_name
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=(15, 120),
                              headers={"User-Agent": "Mozilla/5.0"}) as response:
                response.raise_for_status()
                with open(target, "wb") as f:
                    for chunk in response.iter_content(1 << 16):
                        f.write(chunk)
            return
        except (requests.ConnectionError, requests.Timeout):
            if attempt == attempts:
                raise
            time.sleep(attempt)


def _reason(exc: BaseException) -> str:
    """A short cause for a failed download."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "no connection"
    if isinstance(exc, AssertionError):
        return "checksum mismatch: the hosted file changed or the download is broken"
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fetch(dfile: Any, staging: Path) -> None:
    """Download dfile into ``staging``, verify its checksum and unpack it (CRSLab's steps)."""
    download = _module("crslab.download")
    if dfile.from_google:
        download.download_from_google_drive(dfile.url, str(staging / dfile.file_name))
    else:
        _download(dfile.url, staging, dfile.file_name)
    dfile.checksum(str(staging))
    if dfile.zipped:
        download.untar(str(staging), dfile.file_name)


def safe_build(dpath: str, dfile: Any, version: str | None = None) -> None:
    """crslab.download.build that never deletes a folder and fails with a UserError.

    - a folder registered with :func:`register_local_resource`: used as it is;
    - `.built` with this version: CRSLab's download, used as it is;
    - a folder holding ``dataset.json`` (made by lotcrs_plugin), or with files but no `.built`,
      or a `.built` of another version: UserError, nothing touched; except that a folder
      holding the archive ``dfile.file_name`` (put there by the user) is verified and unpacked;
    - absent or empty: downloaded into a temporary sibling, renamed into place when complete;
      a failed download raises a UserError naming the URL, the file and where to put it.
    """
    download = _module("crslab.download")
    path = Path(dpath)
    if is_local_resource(path):
        return
    if download.check_build(str(path), version):
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, but CRSLab expects a folder there for {dfile.file_name}; "
                        "move the file away")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    what = f"CRSLab's download of {dfile.file_name}" + (f" version {version}" if version else "")
    if PLUGIN_DATASET_MARKER in entries:
        raise UserError(f"{path} holds a dataset made by lotcrs_plugin ({PLUGIN_DATASET_MARKER}), not "
                        f"{what}; select it by its own dataset name, or move it away to let CRSLab "
                        "download its data there")
    if dfile.file_name in entries and ".built" not in entries:
        _install_archive(path, dfile, version)
        return
    if entries:
        found = _built_version(path)
        if found is None:
            raise UserError(f"{path} exists and is not {what} (no .built marker: made by hand?); it is "
                            f"left untouched: move it away to let CRSLab download there, or put "
                            f"{dfile.file_name} into it to install that archive{_pretrain_hint(path)}")
        raise UserError(f"{path} exists and is not {what} (its .built names version {found or '(none)'}); "
                        f"it is left untouched: move or delete it yourself to let CRSLab download "
                        f"version {version}{_pretrain_hint(path)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.download-", dir=path.parent))
    try:
        try:
            _fetch(dfile, staging)
        except Exception as exc:
            raise UserError(
                f"cannot download {dfile.file_name} from {dfile.url} ({_reason(exc)}); download it "
                f"yourself and put it at {path / dfile.file_name} (it is checked and unpacked on "
                f"the next run){_pretrain_hint(path)}") from None
        download.mark_done(str(staging), version)
        if path.is_dir():
            path.rmdir()  # empty: checked above
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # our own temporary folder


def _install_archive(path: Path, dfile: Any, version: str | None) -> None:
    """Unpack an archive the user put into ``path`` (kept there), after checking its hash."""
    download = _module("crslab.download")
    try:
        dfile.checksum(str(path))
    except AssertionError:
        raise UserError(f"{path / dfile.file_name} does not have the SHA-256 CRSLab expects "
                        f"({dfile.hashcode}); download it again from {dfile.url}") from None
    if dfile.zipped:
        download.untar(str(path), dfile.file_name, deleteTar=False)
    download.mark_done(str(path), version)


def _patch_safe_build() -> None:
    """Symptom: crslab.download.build DELETES dpath (rmtree) when its `.built` names another
    version, and downloads into any folder without `.built` (offline: 15 s of retries, then a
    RuntimeError). :func:`safe_build` replaces it in crslab.download and in every crslab module
    that imported it (dataset base, model base, conv and standard evaluators)."""
    download = _module("crslab.download")
    importlib.import_module("crslab.evaluator")
    original = download.build
    if _is_patched(original):
        return
    ORIGINALS["safe_build"] = original
    _replace_everywhere(original, _mark(safe_build, "safe_build"))


# ---- local pretrained models -----------------------------------------------------------------

PRETRAINED_KINDS = ("bert", "gpt2")


def pretrained_override(opt: Any, dpath: str | os.PathLike) -> str | None:
    """The folder of ``opt['pretrained_path'][kind]`` when ``dpath`` is PRETRAIN_PATH/<kind>/<lang>."""
    getter = getattr(opt, "get", None)
    mapping = getter("pretrained_path", None) if getter else None
    if not mapping:
        return None
    if not isinstance(mapping, dict):
        raise UserError(f"config key pretrained_path must be a mapping like {{bert: DIR, gpt2: DIR}}, "
                        f"not {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(PRETRAINED_KINDS))
    if unknown:
        raise UserError(f"pretrained_path: unknown key(s) {', '.join(map(str, unknown))}; known: "
                        f"{', '.join(PRETRAINED_KINDS)}")
    path = Path(dpath)
    kind = path.parent.name
    pretrain = _key(_module("crslab.config").PRETRAIN_PATH)
    if kind not in mapping or _key(path.parent.parent) != pretrain:
        return None
    local = mapping[kind]
    if not isinstance(local, (str, os.PathLike)):
        raise UserError(f"pretrained_path.{kind} must be a folder path, not {type(local).__name__}")
    local_path = Path(local).expanduser()
    if not (local_path / "config.json").is_file():
        raise UserError(f"pretrained_path.{kind}: {local_path} is not a saved Hugging Face model folder "
                        "(no config.json); save one with model.save_pretrained(DIR)")
    return str(local_path.resolve())


def _patch_pretrained_path() -> None:
    """Feature (config key ``pretrained_path: {bert: DIR, gpt2: DIR}``): a model whose resource
    folder is PRETRAIN_PATH/<kind>/<lang> loads from DIR instead, and build() does nothing for
    it (DIR is registered as a local resource). BaseModel.__init__ is wrapped, so every CRSLab
    model (BERT, TGRec, InspiredRec, GPT2, TGConv, InspiredConv, the policy BERTs) and
    plugin model takes it; the interactive-mode tokenizers of BaseSystem read DIR too."""
    base = _module("crslab.model.base").BaseModel
    system = _module("crslab.system.base").BaseSystem

    def make_init(original: Callable) -> Callable:
        def __init__(self, opt, device, dpath=None, resource=None):
            if dpath is not None and resource is not None:
                local = pretrained_override(opt, dpath)
                if local is not None:
                    register_local_resource(local)
                    dpath = local
            original(self, opt, device, dpath, resource)
        return __init__

    def make_tokenize(original: Callable) -> Callable:
        def tokenize(self, text, path):
            local = pretrained_override(self.opt, path)
            return original(self, text, local if local is not None else path)
        return tokenize

    _patch_method(base, "__init__", make_init, "pretrained_path")
    _patch_method(system, "bert_tokenize", make_tokenize, "pretrained_path")
    _patch_method(system, "gpt2_tokenize", make_tokenize, "pretrained_path")
