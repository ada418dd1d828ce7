"""`crslab run`: CRSLab's quick_start flow with the plugin's config, paths, logging and results.

Differences from ``crslab.quick_start.run_crslab``: the config is validated first; datasets,
checkpoints and logs go under the user's root; the caller's loguru sinks are left alone (one
file sink is added for the run and removed after); the test metrics of every stage are
returned and written to ``<root>/results/<run>.json``, with the merged config that ran and
the files it was merged from (a config's ``base:`` chain) and its ``--set`` overrides.

Started by torchrun with several processes (lotcrs_plugin.system.distributed), process 0 alone
writes the log file, the results file and a saved system; the dataset is prepared by process 0
first, then read by the others.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from loguru import logger

from lotcrs_plugin import config as run_config
from lotcrs_plugin.errors import UserError

# run(None): the LOT-CRS half of the demo (`crslab run` with no --config runs it beside the plain
# backbone: lotcrs_plugin.demo), the whole pipeline on the synthetic dataset, offline
DEMO_CONFIG = Path(__file__).with_name("configs") / "lotcrs_demo.yaml"


@dataclass
class RunResult:
    """What a run produced: the test metrics per stage and where its files are."""

    dataset: str
    model_name: str
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)  # the tested epoch of the rec stage
    config: dict[str, Any] = field(default_factory=dict)  # the merged, validated config that ran
    config_files: list[str] = field(default_factory=list)  # the config file, then its bases
    overrides: list[str] = field(default_factory=list)  # the --set expressions, in order
    # name -> long-tail test report of a variant of the tested model (the LOT-CRS system's
    # 'without_tail_slots': the model's own lists); compare shows each as a row of its own
    test_variants: dict[str, Any] = field(default_factory=dict)
    commit: str = ""  # the plugin's git commit that ran ('+dirty': with uncommitted changes), else ''
    log_file: str = ""
    results_file: str = ""
    model_file: str = ""
    seconds: float = 0.0


def code_commit() -> str:
    """The git commit of the plugin's source tree, '+dirty' when its tracked files changed ('' for
    an installed copy without git). Recorded with every result, so a table row names its code."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return ""
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                "--", "lotcrs_plugin"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("+dirty" if dirty else "")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _metrics_as_numbers(metrics) -> dict[str, float]:
    return {name: float(metric.value()) for name, metric in metrics.report().items()}


def _capture_reports(evaluator, sink: list[dict[str, Any]]) -> None:
    """Record every report an evaluator makes, so test metrics survive later stages' resets."""
    original = evaluator.report

    def report(*args, **kwargs):
        mode = kwargs.get("mode", args[1] if len(args) > 1 else "test")
        epoch = kwargs.get("epoch", args[0] if args else -1)
        entry: dict[str, Any] = {"mode": mode, "epoch": epoch}
        for attr in ("rec_metrics", "gen_metrics", "optim_metrics"):
            if hasattr(evaluator, attr):
                entry[attr.split("_")[0]] = _metrics_as_numbers(getattr(evaluator, attr))
        out = original(*args, **kwargs)
        # None after a report with no item samples (training epochs, conversation stages)
        longtail = getattr(evaluator, "last_report", None)
        if longtail is not None:
            entry["longtail"] = longtail
        sink.append(entry)
        return out

    evaluator.report = report


def run(
    config: str | os.PathLike | dict | None = None,
    *,
    gpu: str = "-1",
    seed: int | None = None,
    output_root: str | None = None,
    save_system: bool = False,
    restore_system: bool = False,
    interact: bool = False,
    tensorboard: bool = False,
    debug: bool = False,
    save_data: bool = False,
    restore_data: bool = False,
    dist_backend: str | None = None,
    overrides: Sequence[str] = (),
) -> RunResult:
    """Train and test the system a config describes (CRSLab's or the plugin's). overrides:
    ``--set`` expressions (``lotcrs.epochs=5``) applied after the config's files. dist_backend:
    torch.distributed's backend when torchrun started several processes (over the config's
    ``distributed.backend``).

    Every check that needs no data (keys, types, names, the backbone and its path) runs before
    the dataset is loaded."""
    started = time.perf_counter()
    loaded = run_config.load(DEMO_CONFIG if config is None else config, overrides)
    opt, source = loaded.opt, loaded.source
    if loaded.overrides:  # the checks below may be about a key that an override set
        source = f"{source} with " + " ".join(f"--set {o}" for o in loaded.overrides)
    if seed is not None:
        opt["seed"] = seed

    from lotcrs_plugin.registry import register_all

    register_all(output_root or opt.get("output_root"))
    from lotcrs_plugin import paths

    layout = paths.active_layout()
    run_config.check_names(opt, where=source)
    run_config.check_backbone(opt, where=source)
    crs_config = run_config.to_crslab_config(opt, gpu)
    from lotcrs_plugin.system import distributed

    if interact and distributed.launched()[0] > 1:
        raise UserError("--interact talks to one process; run it without torchrun / --nproc")
    dist = distributed.setup(opt.get("distributed"), crs_config.opt, backend=dist_backend)
    try:
        return _run(opt, crs_config, loaded, layout, dist, started, save_system=save_system,
                    restore_system=restore_system, interact=interact, tensorboard=tensorboard, debug=debug,
                    save_data=save_data, restore_data=restore_data)
    finally:
        dist.close()


def reserve_run_name(layout: Any, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ...: the first name whose log file this process creates
    (exclusively) and whose results file does not exist yet. Two runs started in the same second
    (the default name has one-second resolution) thus never share, or overwrite, a log or results file."""
    layout.log.mkdir(parents=True, exist_ok=True)
    results_dir = layout.root / "results"
    for n in range(1, 10_000):
        candidate = base if n == 1 else f"{base}-{n}"
        if (results_dir / f"{candidate}.json").exists():
            continue
        try:
            os.close(os.open(layout.log / f"{candidate}.log", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return candidate
    raise UserError(f"{layout.log}: 10,000 runs named {base}; give another log_name")


def _run(opt: dict, crs_config: Any, loaded: run_config.LoadedConfig, layout: Any, dist: Any, started: float, *, save_system: bool,
         restore_system: bool, interact: bool, tensorboard: bool, debug: bool, save_data: bool,
         restore_data: bool) -> RunResult:
    name = crs_config.opt["model_name"]
    recorded = copy.deepcopy(opt)  # as it was read: CRSLab's systems pop keys from its blocks (optimizer name)
    run_name = opt.get("log_name") or f"{opt['dataset']}_{name}_{time.strftime('%Y-%m-%d-%H-%M-%S')}"
    sink_id = None
    if dist.is_main:  # the other processes log to their console only
        run_name = reserve_run_name(layout, run_name)
        sink_id = logger.add(str(layout.log / f"{run_name}.log"), level="DEBUG" if debug else "INFO")
    log_file = layout.log / f"{run_name}.log"
    try:
        seed_everything(int(opt["seed"]))
        logger.info(f"[lotcrs] config {loaded.describe()}; root {layout.root}")
        logger.info("[Config]\n" + json.dumps(crs_config.opt, indent=2, default=str))
        with dist.main_first():  # process 0 makes the dataset files (and built-in backbones) once
            system = _build_system(crs_config, restore_data, save_data, restore_system, interact, debug,
                                   tensorboard)
        if dist.active and getattr(system, "dist", None) is None:
            raise UserError(f"model {name} trains in one process; several processes (torchrun, --nproc) are for "
                            f"the LOT-CRS systems (model: LOTCRS or LOTCRSPretrain)")
        result = RunResult(dataset=opt["dataset"], model_name=name, commit=code_commit(),
                           log_file=str(log_file) if dist.is_main else "",
                           model_file=str(getattr(system, "model_file", "")), config=recorded,
                           config_files=loaded.files, overrides=loaded.overrides)
        if interact:
            system.interact()
            return result
        if hasattr(system, "evaluator"):
            _capture_reports(system.evaluator, result.reports)
        from lotcrs_plugin.system.selection import attach_selection, selection_summary

        selector = attach_selection(system, opt)
        system.fit()
        result.selection = selection_summary(selector, system)
        result.test_variants = dict(getattr(system, "test_variants", None) or {})
        if save_system and dist.is_main:
            system.save_model()
    finally:
        if sink_id is not None:
            logger.remove(sink_id)
    result.test = {}
    for i, entry in enumerate(r for r in result.reports if r["mode"] == "test"):
        for part in ("rec", "gen"):
            if entry.get(part):
                result.test[part if part not in result.test else f"{part}_{i}"] = entry[part]
        if entry.get("longtail"):
            result.test["longtail"] = entry["longtail"]
    result.seconds = round(time.perf_counter() - started, 2)
    if not dist.is_main:
        return result
    results_dir = layout.root / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    result.results_file = str(results_dir / f"{run_name}.json")
    tmp = Path(result.results_file + ".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=2, default=str), encoding="utf-8")
    tmp.replace(result.results_file)
    return result


def _build_system(crs_config, restore_data, save_data, restore_system, interact, debug, tensorboard):
    from crslab.data import get_dataloader, get_dataset
    from crslab.system import get_system

    tokenize = crs_config["tokenize"]
    if isinstance(tokenize, str):
        dataset = get_dataset(crs_config, tokenize, restore_data, save_data)
        side_data, vocab = dataset.side_data, dataset.vocab
        loaders = [get_dataloader(crs_config, split, vocab)
                   for split in (dataset.train_data, dataset.valid_data, dataset.test_data)]
    else:
        by_tokenize: dict[str, Any] = {}
        loaders = [{}, {}, {}]
        vocab, side_data = {}, {}
        for task, tok in tokenize.items():
            if tok not in by_tokenize:
                by_tokenize[tok] = get_dataset(crs_config, tok, restore_data, save_data)
            dataset = by_tokenize[tok]
            side_data[task], vocab[task] = dataset.side_data, dataset.vocab
            for loader, split in zip(loaders, (dataset.train_data, dataset.valid_data, dataset.test_data)):
                loader[task] = get_dataloader(crs_config, split, vocab[task])
    return get_system(crs_config, *loaders, vocab, side_data, restore_system, interact, debug, tensorboard)
