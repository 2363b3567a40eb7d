"""Training over two processes (gloo on the CPU), against one process as the reference.

* ``parallelism: data`` over 2 ranks ends with the weights, logged losses and evaluation
  table of the 1-process run (LoRA and MixLoRA together; dropout and router jitter off and on);
* ``parallelism: adapter``: every adapter equals the adapter trained alone, one table;
* FSDP2 (``--fsdp``, with gradient checkpointing) on the CPU equals one process;
* a run killed with SIGKILL resumes bit-exact on 2 ranks (under torchrun); a Ctrl-C'd one
  resumes on 1 process;
* a rank that raises ends the job (torchrun) within seconds, naming the rank;
* ranks other than 0 write nothing into the output folder.

The two-process runs share one session of spawned processes (`distributed_harness`) and one
torchrun job, so interpreter start-up and imports (most of a run's time here) are paid twice
in all; the references run in this process. MixLoRA's
compiled expert kernels are off on both sides (`MLORA_COMPILE=0`): each process would compile
them afresh, which costs more than these tiny runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mlora.cli import main
from mlora.train import TrainError
from mlora.train.checkpoint import Resume
from mlora.train.distributed import World, partition
from mlora.train.parallel import check_resume
from tests.train.distributed_harness import free_ports, read_records, run_session
from tests.train.helpers import FIXTURES, OTHER_PAIRS, PAIRS, metrics, weights, write_pairs

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
MIX_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def lora(name: str, data: str, task: str = "arc-e", **overrides) -> dict:
    return {"name": name, "task_name": task, "data": data, "lr": 1e-2, "batch_size": 4, "micro_batch_size": 2,
            "num_epochs": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS,
            "evaluate_batch_size": 4, **overrides}


def mixlora(name: str, data: str, task: str = "arc-e", **overrides) -> dict:
    # batch 8 of micro-batches of 2: four micro-batches, two global steps per optimizer step on 2
    # ranks, so checkpoints fall mid-accumulation too.
    settings = {"routing_strategy": "mixlora", "num_experts": 4, "top_k": 2, "batch_size": 8,
                "target_modules": MIX_TARGETS}
    return lora(name, data, task, **{**settings, **overrides})


def write_config(path: Path, adapters: list[dict], **run_level) -> Path:
    settings = {"cutoff_len": 64, "save_step": 2, "train_lora_candidate_num": 2, "train_lora_simultaneously_num": 2}
    path.write_text(json.dumps({**settings, **run_level, "lora": adapters}))
    return path


def argv(config: Path, base: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--config", str(config), "--base_model", base, "--output_dir", str(out), "--seed", "5", *extra]


def scenario(config: Path, base: str, out: Path, *extra: str, **action) -> dict:
    return {"argv": argv(config, base, out, *extra), "output_dir": str(out), **action}


@pytest.fixture(scope="module")
def no_compile():
    """Eager MixLoRA experts here and in the spawned processes (see the module docstring)."""
    saved = os.environ.get("MLORA_COMPILE")
    os.environ["MLORA_COMPILE"] = "0"
    yield
    if saved is None:
        os.environ.pop("MLORA_COMPILE")
    else:
        os.environ["MLORA_COMPILE"] = saved


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base_model, no_compile):
    """The configs, and one 2-process session running every scenario of this module."""
    root = tmp_path_factory.mktemp("distributed")
    arc = str(FIXTURES / "arc-e")
    pairs = write_pairs(root, PAIRS + OTHER_PAIRS, "pairs.json")
    configs = {
        # Benchmark task: every run is scored too (the evaluation is sharded over the ranks).
        "plain": write_config(root / "plain.json", [lora("lora", arc), mixlora("mix", arc)]),
        # Dropout on every LoRA and expert, router jitter: each micro-batch's streams must survive the
        # split. lr 1e-3: AdamW turns the rounding of a summed gradient near zero into a step of up
        # to lr, and the ranks sum the micro-batch gradients in another order than one process.
        "dropout": write_config(root / "dropout.json", [
            lora("lora", pairs, "casual", lora_dropout=0.1, lr=1e-3),
            mixlora("mix", pairs, "casual", lora_dropout=0.1, jitter_noise=0.1, lr=1e-3)], save_step=1),
        "adapter": write_config(root / "adapter.json", [
            lora("a", arc), lora("b", arc, r=2, lora_dropout=0.1), mixlora("c", arc, batch_size=4)],
            parallelism="adapter"),
    }
    out = {k: root / k for k in ("plain", "dropout", "adapter", "fsdp", "sigint", "kill")}
    base = base_model
    scenarios = [
        scenario(configs["plain"], base, out["plain"]),
        scenario(configs["dropout"], base, out["dropout"]),
        scenario(configs["adapter"], base, out["adapter"]),
        scenario(configs["plain"], base, out["fsdp"], "--fsdp", "--gradient_checkpointing"),
        scenario(configs["dropout"], base, out["sigint"], action="sigint", rank=0, after_steps=3),
        scenario(configs["dropout"], base, out["kill"], action="kill", rank=1, after_steps=5),  # last: rank 1 dies
    ]
    records = run_session(scenarios, root / "records")
    results = dict(zip(["plain", "dropout", "adapter", "fsdp", "sigint", "kill"], records))
    # Then the real launcher: resume the killed run, and a run where rank 1 raises (last: it ends the job).
    launched = [scenario(configs["dropout"], base, out["kill"], "--resume"),
                scenario(configs["dropout"], base, root / "raise", "--dist_timeout", "60", action="raise", rank=1,
                         after_steps=2)]
    [port, *ports] = free_ports(1 + len(launched))
    (root / "launched.json").write_text(json.dumps({"scenarios": launched, "ports": ports}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "train" / "torchrun_entry.py"), str(root / "launched.json"), str(root / "launched")]
    (root / "launched").mkdir()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    results["resume"], results["raise"] = read_records(root / "launched", 2, 2)
    return {"root": root, "configs": configs, "out": out, "results": results, "base": base, "torchrun": proc,
            "torchrun_end": time.time()}


def one_process(setup, config: str, out: Path, *extra: str) -> None:
    assert main(argv(setup["configs"][config], setup["base"], out, *extra)) == 0


def assert_close_weights(got: Path, want: Path, names, atol: float = 1e-5) -> None:
    for name in names:
        a, b = weights(got / name), weights(want / name)
        assert set(a) == set(b)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= atol, f"{name}: max abs difference {worst:.3g}"


def assert_same_logs(got: Path, want: Path, names) -> None:
    for name in names:
        a, b = metrics(got, name), metrics(want, name)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for x, y in zip(a, b):
            assert x["tokens"] == y["tokens"] and x.get("event") == y.get("event")
            for key in ("loss", "aux_loss", "grad_norm", "lr"):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (name, x["step"], key)


def eval_table(out: Path) -> list[tuple]:
    doc = json.loads((out / "_mlora" / "eval_results.json").read_text())
    return [(r["adapter"], r["task"], r["items"], r["correct"], r["acc"]) for r in doc["results"]]


def ok(records) -> None:
    for rank, record in enumerate(records):
        assert record is not None and record["code"] == 0, f"rank {rank}: {record and record['stderr'][-3000:]}"


def test_data_parallel_equals_one_process(setup, tmp_path):
    ok(setup["results"]["plain"])
    one_process(setup, "plain", tmp_path / "one")
    two = setup["out"]["plain"]
    assert_close_weights(two, tmp_path / "one", ["lora", "mix"])
    assert_same_logs(two, tmp_path / "one", ["lora", "mix"])
    assert eval_table(two) == eval_table(tmp_path / "one")
    leader, follower = setup["results"]["plain"]
    assert "evaluation:" in leader["stdout"] and "arc-e" in leader["stdout"]
    assert follower["stdout"] == ""  # rank 0 alone prints the summary and the table


def test_data_parallel_keeps_each_sample_s_dropout_and_jitter(setup, tmp_path):
    ok(setup["results"]["dropout"])
    one_process(setup, "dropout", tmp_path / "one")
    assert_close_weights(setup["out"]["dropout"], tmp_path / "one", ["lora", "mix"])
    assert_same_logs(setup["out"]["dropout"], tmp_path / "one", ["lora", "mix"])


def test_adapter_parallel_trains_each_adapter_as_alone(setup, tmp_path):
    ok(setup["results"]["adapter"])
    out = setup["out"]["adapter"]
    doc = json.loads(setup["configs"]["adapter"].read_text())
    for adapter in doc["lora"]:
        alone = write_config(tmp_path / f"{adapter['name']}.json", [adapter])
        assert main(argv(alone, setup["base"], tmp_path / adapter["name"])) == 0
        assert_close_weights(out, tmp_path / adapter["name"], [adapter["name"]])
        assert_same_logs(out, tmp_path / adapter["name"], [adapter["name"]])
        mine = [row for row in eval_table(out) if row[0] == adapter["name"]]
        assert mine == eval_table(tmp_path / adapter["name"])
    assert sorted(row[0] for row in eval_table(out)) == ["a", "b", "c"]  # one table, gathered
    assert "rank 1 trains" not in setup["results"]["adapter"][0]["stderr"]  # per-rank INFO stays on its rank


def test_fsdp_sharded_base_equals_one_process(setup, tmp_path):
    ok(setup["results"]["fsdp"])
    assert "FSDP: the base is sharded over 2 processes (2 decoder layers)" in setup["results"]["fsdp"][0]["stderr"]
    one_process(setup, "plain", tmp_path / "one")
    assert_close_weights(setup["out"]["fsdp"], tmp_path / "one", ["lora", "mix"])
    assert eval_table(setup["out"]["fsdp"]) == eval_table(tmp_path / "one")


def test_only_rank_0_writes(setup):
    for name, records in setup["results"].items():
        for rank, record in enumerate(records[1:], 1):
            if record is not None:
                assert record["writes"] == [], f"{name}: rank {rank} wrote {record['writes'][:5]}"
    manifest = json.loads((setup["out"]["plain"] / "_mlora" / "manifest.json").read_text())["created"]
    assert {"lora", "mix", "_mlora/logs/lora.jsonl", "_mlora/eval_results.json"} <= set(manifest)


def test_ctrl_c_checkpoints_then_resumes_on_one_process(setup):
    records = setup["results"]["sigint"]
    assert [r["code"] for r in records] == [130, 130], [r["stderr"][-2000:] for r in records]
    out = setup["out"]["sigint"]
    assert "continue with --resume" in records[0]["stdout"]
    # The data position is global: one process continues the 2-process run exactly (up to float order).
    one_process(setup, "dropout", out, "--resume")
    assert_close_weights(out, setup["out"]["dropout"], ["lora", "mix"])
    assert_same_logs(out, setup["out"]["dropout"], ["lora", "mix"])


def test_killed_run_resumes_bit_exact_on_two_ranks(setup):
    leader, follower = setup["results"]["kill"]
    assert follower is None  # SIGKILL: no record
    assert leader["code"] == 1 and "error: rank 0: lost contact with the other processes" in leader["stderr"]
    out = setup["out"]["kill"]
    ok(setup["results"]["resume"])  # under torchrun
    assert "resuming from" in setup["results"]["resume"][0]["stderr"]
    want = setup["out"]["dropout"]
    for name in ("lora", "mix"):
        got, expected = weights(out / name), weights(want / name)
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs"
        assert metrics(out, name) == [{**r, "seconds": m["seconds"]} for r, m in zip(metrics(want, name),
                                                                                    metrics(out, name))]


def test_a_rank_that_raises_ends_the_job(setup):
    """The real launcher: torchrun, rank 1 raising mid-run; the job ends, naming it."""
    proc, (leader, follower) = setup["torchrun"], setup["results"]["raise"]
    assert proc.returncode != 0
    assert follower["code"] == 1 and "error: rank 1: RuntimeError: injected failure" in follower["stderr"]
    assert "Traceback" in follower["stderr"]  # a bug's traceback, then the line naming the rank
    if leader is not None:  # rank 0 may be ended by torchrun before it writes its record
        assert leader["code"] != 0
    seconds = setup["torchrun_end"] - follower["started"]
    assert seconds < 60, f"the job took {seconds:.0f} s to end after the failing run started"


def test_adapter_checkpoint_refuses_another_process_count(tmp_path):
    resume = Resume(tmp_path / "step-00000004", 5, "run", distributed={"parallelism": "adapter", "world_size": 2})
    with pytest.raises(TrainError, match="same number of processes.*--nproc_per_node 2"):
        check_resume(resume, "adapter", World(0, 3, 0, "gloo", 60.0))
    with pytest.raises(TrainError, match="parallelism 'adapter' over 2"):
        check_resume(resume, "data", None)
    check_resume(resume, "adapter", World(0, 2, 0, "gloo", 60.0))
    data = Resume(tmp_path / "step-00000004", 5, "run", distributed={"parallelism": "data", "world_size": 2})
    check_resume(data, "data", None)  # continues on any number of processes
    check_resume(data, "data", World(1, 4, 1, "gloo", 60.0))
    single = Resume(tmp_path / "step-00000004", 5, "run")  # a one-process checkpoint: the key is idle there
    check_resume(single, "adapter", None)


def test_partition_balances_estimated_cost():
    plan = partition({"a": 10.0, "b": 7.0, "c": 5.0, "d": 4.0, "e": 1.0}, 2)
    loads = [sum(c for n, c in {"a": 10.0, "b": 7.0, "c": 5.0, "d": 4.0, "e": 1.0}.items() if plan[n] == r)
             for r in range(2)]
    assert sorted(loads) == [13.0, 14.0] and list(plan) == ["a", "b", "c", "d", "e"]
    assert partition({"x": 1.0}, 3) == {"x": 0}
