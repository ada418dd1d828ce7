"""Multi-process training (lotcrs_plugin.system.distributed): how the micro-batches of a step are
dealt out, and the whole LOT-CRS pipeline (pre-training -> store -> teacher -> fine-tuning ->
test) in two gloo processes on CPU started by `crslab run --nproc 2` (torchrun), compared with the
same run in one process: the same parameters after every step (DDP averages the gradients of the
shards of the one-process step), the same validation scores and test metrics, one set of files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lotcrs_plugin.errors import UserError
from lotcrs_plugin.system import distributed
from lotcrs_plugin.system.distributed import Dist, DistributedConfig, plan

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_items": 60, "n_conversations": 160, "seed": 3}
ADAM_EPS = 1e-3


# ---- dealing out micro-batches ---------------------------------------------------------------

@pytest.mark.parametrize("n, acc, world, start", [(7, 4, 2, 0), (5, 2, 2, 0), (9, 3, 2, 3), (10, 4, 4, 4),
                                                  (6, 2, 1, 2), (3, 2, 2, 2)])
def test_plan_deals_every_micro_batch_of_a_step_once(n, acc, world, start):
    plans = [plan(n, start, acc, rank, world) for rank in range(world)]
    real = sorted(m.index for p in plans for m in p if m.scale)
    assert real == list(range(start, n))                       # every micro-batch once, none twice
    for p in plans:
        assert [m.index for m in p] == sorted({m.index for m in p})   # in order, no repeats
        for m in p:
            assert m.scale in (0.0, float(world)) and m.end == min((m.index // acc + 1) * acc, n)
        # one exchange per step in every process, after its last micro-batch there
        assert [m.end for m in p if m.last] == [min(s + acc, n) for s in range(start // acc * acc, n, acc)]
    if world == 1:  # one process: the loop of before (step after every acc-th and the last micro-batch)
        assert [(m.index, m.last) for m in plans[0]] == [(i, (i + 1) % acc == 0 or i + 1 == n)
                                                        for i in range(start, n)]


def test_a_short_last_step_gives_the_idle_process_a_stand_in():
    p1 = plan(5, 0, 2, rank=1, world=2)  # steps [0, 1], [2, 3], [4]: process 1 has nothing in the last
    assert [(m.index, m.scale, m.last) for m in p1] == [(1, 2.0, True), (3, 2.0, True), (4, 0.0, True)]


def test_config_block_and_accumulation_checks():
    assert DistributedConfig.from_dict(None).backend == "auto"
    with pytest.raises(UserError, match="unknown key 'backed'; known keys: backend"):
        DistributedConfig.from_dict({"backed": "gloo"})
    with pytest.raises(UserError, match="key 'backend' must be auto, gloo, nccl"):
        DistributedConfig.from_dict({"backend": "mpi"})
    with pytest.raises(UserError, match="key 'timeout_minutes' must be an integer"):
        DistributedConfig.from_dict({"timeout_minutes": "10"})
    with pytest.raises(UserError, match="lotcrs.grad_accumulation 1 is below the 2 processes"):
        Dist(world=2, rank=1).check_accumulation(1, "lotcrs.grad_accumulation")
    Dist(world=2, rank=1).check_accumulation(4, "lotcrs.grad_accumulation")
    one = distributed.current()  # no torchrun here: one process, every method a no-op
    assert not one.active and one.is_main and one.wrap(torch.nn.Linear(2, 2)) is None
    assert one.broadcast(3.5) == 3.5 and one.sum_over_processes({"a": 2.0}, 4) == ({"a": 2.0}, 4)


def test_nproc_starts_torchrun_with_the_same_arguments():
    from lotcrs_plugin.cli import build_parser
    from lotcrs_plugin.commands.run import launch_command

    args = build_parser().parse_args(["run", "--config", "x.yaml", "--nproc", "2", "--seed", "7",
                                      "--save-system", "--dist-backend", "gloo"])
    cmd = launch_command(args)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    tail = cmd[cmd.index("lotcrs_plugin.cli") + 1:]
    assert tail == ["run", "--config", "x.yaml", "--gpu", "-1", "--seed", "7", "--dist-backend", "gloo",
                    "--save-system"]


# ---- two processes against one ----------------------------------------------------------------

@pytest.fixture(scope="module")
def quiet_bert(tmp_path_factory) -> Path:
    """A tiny BERT without dropout (nothing random in a training step but the data order, which
    is a function of the seed) whose vocabulary covers the small synthetic dataset."""
    from lotcrs_plugin.data.simulator import load_simulated, simulate
    from lotcrs_plugin.data.synthetic.config import SyntheticConfig
    from lotcrs_plugin.data.synthetic.dataset import ensure_generated

    from support import tiny_bert

    root = tmp_path_factory.mktemp("ddp_vocab")
    folder = ensure_generated(SyntheticConfig(**SMALL), root / "dataset")
    dialogs = load_simulated(simulate(folder, {"per_item": 2, "cache_dir": str(root / "sim")}))
    dialogs += json.loads((folder / "train_data.json").read_text())
    words = {w for d in dialogs for t in d["dialog"] for w in t["text"]}
    with torch.random.fork_rng(devices=[]):
        return tiny_bert(root / "bert", sorted(words), dropout=0.0)


def pipeline_config(bert: Path) -> dict:
    """The demo pipeline shrunk to seconds, with nothing drawn from the global random state during
    training (no dropout, CCA only: DMP masking draws; no retrieval loss: its negatives draw), so
    one process and two must agree up to summation order; fp32, because bf16 autocast (on where
    the CPU has AVX512_BF16 / AMX) rounds every matmul output to 3 digits, where a different
    kernel blocking of a sum shows, far above the fp32 tolerances below. Adam's eps 1e-3 instead of
    1e-8: a gradient that is only what is left of cancelling float sums (a key bias has none in exact
    arithmetic) then moves its parameter by ~lr * 1e-9 / eps, not by ~lr, so the order of those sums,
    which MKL on an Intel CPU varies with memory alignment, cannot throw the two runs apart (checked:
    noise of 1e-7 added to every gradient passes, a gradient 0.1 % off fails). grad_accumulation 2 in both stages;
    3 fine-tuning micro-batches per epoch leave process 1 a stand-in in each epoch's last step."""
    opt = yaml.safe_load((REPO / "lotcrs_plugin" / "configs" / "lotcrs_demo.yaml").read_text())
    opt["synthetic"] = dict(SMALL)
    opt["simulation"] = {"per_item": 2}
    opt["backbone_path"] = str(bert)
    opt["distributed"] = {"backend": "gloo", "timeout_minutes": 5}
    opt["lotcrs_pretrain"] = {"run_name": "ddp_pre", "epochs": 1, "max_steps": 3, "batch_size": 4,
                              "grad_accumulation": 2, "lr": 0.01, "max_length": 48, "checkpoint_every": 0,
                              "eval_max_batches": 1, "pooling": "mean", "dmp_weight": 0.0, "log_every": 1, "bf16": False,
                              "adam_eps": ADAM_EPS}
    opt["retrieval"] = {"top_k": 4, "max_per_item": 2, "loss_weight": 0.0, "dropout": 0.0}
    opt["lotcrs"] = {"run_name": "ddp_ft", "epochs": 2, "batch_size": 8, "grad_accumulation": 2,
                     "eval_batch_size": 64, "lr": 0.005, "max_length": 48, "max_train_batches": 3,
                     "impatience": 0, "teacher_epochs": 1, "teacher_max_samples": 16, "teacher_lr": 0.005,
                     "store_refresh": "epoch", "log_every": 1, "threads": 1, "bf16": False,
                     "adam_eps": ADAM_EPS}
    return opt


def assert_same_state(a: dict, b: dict, what: str) -> None:
    """The same parameters and AdamW moments in two checkpoints (float32 sums in another order
    differ by ~1e-7; a lost or doubled micro-batch moves Adam's first steps by ~lr = 1e-2 / 5e-3,
    a wrong gradient scale the moments by that factor: Adam's update itself hardly sees it)."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 10
    for i in sa:
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][moment], sa[i][moment], rtol=1e-3, atol=1e-7,
                                       msg=f"{what}: parameter {i} {moment}")


def test_two_gloo_processes_match_one_process(quiet_bert, tmp_path, monkeypatch):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(quiet_bert)))
    two_home, one_home = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "LOTCRS_HOME": str(two_home), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lotcrs_plugin.cli", "run", "--config", str(config),
                             "--nproc", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    # meanwhile, the same run in this process
    from lotcrs_plugin.runner import run

    monkeypatch.setenv("LOTCRS_HOME", str(one_home))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(str(config))
    finally:
        torch.set_num_threads(threads)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "process 0 of 2" in out and "backend gloo" in out
    print(f"two processes: {time.perf_counter() - started:.1f}s, one: {one.seconds}s")

    # one set of files, written by process 0, and nothing in the current folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "pipeline.yaml", "two"]
    results = list((two_home / "results").glob("*.json"))
    assert len(results) == 1 and len(list((two_home / "log").glob("*.log"))) == 1
    assert not list(two_home.rglob("*.tmp")) and not list(two_home.rglob(".*.tmp"))
    two = json.loads(results[0].read_text())
    for home in (one_home, two_home):
        assert (home / "save" / "ddp_pre" / "backbone" / "lotcrs_backbone.json").is_file()
        assert (home / "save" / "ddp_ft" / "best.pt").is_file()

    # pre-training: the same parameters after its 3 steps (6 micro-batches, 3 in each process)
    a = torch.load(one_home / "save" / "ddp_pre" / "checkpoint.pt", weights_only=True)
    b = torch.load(two_home / "save" / "ddp_pre" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 3 and a["batch_in_epoch"] == b["batch_in_epoch"] == 6
    assert {g["eps"] for c in (a, b) for g in c["optimizer"]["param_groups"]} == {ADAM_EPS}
    assert_same_state(a, b, "pre-training")
    # fine-tuning: 2 epochs of 2 steps each, the same parameters, scores, best epoch and test
    a = torch.load(one_home / "save" / "ddp_ft" / "checkpoint.pt", weights_only=True)
    b = torch.load(two_home / "save" / "ddp_ft" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 2
    assert {g["eps"] for c in (a, b) for g in c["optimizer"]["param_groups"]} == {ADAM_EPS}
    assert_same_state(a, b, "fine-tuning")
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["score"] == pytest.approx(hb["score"], abs=1e-6)
        for k, v in ha["train"].items():  # the logged losses cover both processes' micro-batches
            assert hb["train"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert a["best_epoch"] == b["best_epoch"] == one.selection["selected_epoch"] == two["selection"]["selected_epoch"]
    m1, m2 = one.test["longtail"]["metrics"], two["test"]["longtail"]["metrics"]
    assert m1.keys() == m2.keys() and one.test["longtail"]["n_samples"] == two["test"]["longtail"]["n_samples"]
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], abs=1e-6), k
