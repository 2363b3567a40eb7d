"""Training over two processes (gloo on the CPU), against one process as the reference.

* ``parallelism: data`` over 2 ranks ends with the weights, logged losses and evaluation
  table of the 1-process run (LoRA and MixLoRA together; dropout and router jitter off and on);
* ``parallelism: adapter``: every adapter equals the adapter trained alone, one table;
* FSDP2 (``--fsdp``, with gradient checkpointing) on the CPU equals one process;
* a run killed with SIGKILL resumes bit-exact on 2 ranks (under torchrun), so does a stopped
  adapter-parallel one; a Ctrl-C'd data-parallel one resumes on 1 process;
* a non-finite loss on one rank skips that step on every rank;
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
import signal
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
        # Benchmark task: every run is scored at the end, lora also during training (the scoring
        # is sharded over the ranks).
        "plain": write_config(root / "plain.json", [lora("lora", arc, evaluate_steps=3), mixlora("mix", arc)]),
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
    names = ("plain", "dropout", "adapter", "fsdp", "nan", "sigint", "adapter-sigint", "raise", "kill")
    out = {k: root / k for k in names}
    base = base_model
    scenarios = [
        scenario(configs["plain"], base, out["plain"]),
        scenario(configs["dropout"], base, out["dropout"]),
        scenario(configs["adapter"], base, out["adapter"]),
        scenario(configs["plain"], base, out["fsdp"], "--fsdp", "--gradient_checkpointing", "--dtype", "bf16"),
        # Rank 1 trains micro-batch 1 of lora's second batch (its offset 0 in that step): a NaN there.
        scenario(configs["dropout"], base, out["nan"], action="nan", rank=1, at=["lora", 0, 1, 0]),
        scenario(configs["dropout"], base, out["sigint"], action="sigint", rank=0, after_steps=3),
        scenario(configs["adapter"], base, out["adapter-sigint"], action="sigint", rank=1, after_steps=2),
        scenario(configs["dropout"], base, out["raise"], "--dist_timeout", "60", action="raise", rank=1,
                 after_steps=2),
        scenario(configs["dropout"], base, out["kill"], action="kill", rank=1, after_steps=5),  # last: rank 1 dies
    ]
    records = run_session(scenarios, root / "records")
    results = dict(zip(names, records))
    # Then the real launcher: resume the killed and the stopped adapter-parallel runs, and a run where
    # rank 1 raises (last: it ends the job).
    launched = [scenario(configs["dropout"], base, out["kill"], "--resume"),
                scenario(configs["adapter"], base, out["adapter-sigint"], "--resume"),
                scenario(configs["dropout"], base, root / "raise-torchrun", "--dist_timeout", "60", action="raise",
                         rank=1, after_steps=2)]
    [port, *ports] = free_ports(1 + len(launched))
    (root / "launched.json").write_text(json.dumps({"scenarios": launched, "ports": ports}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "train" / "torchrun_entry.py"), str(root / "launched.json"), str(root / "launched")]
    (root / "launched").mkdir()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    results["resume"], results["adapter-resume"], results["raise-torchrun"] = read_records(root / "launched", 3, 2)
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
            assert x.get("tokens") == y.get("tokens") and x.get("event") == y.get("event")
            for key in ("loss", "aux_loss", "grad_norm", "lr"):
                if y.get(key) is None:  # an event, or a skipped step's gradient norm
                    assert x.get(key) is None, (name, x["step"], key)
                else:
                    assert x.get(key) == pytest.approx(y[key], rel=1e-5, abs=1e-7), (name, x["step"], key)


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
    scored = [(r["step"], r["items"], r["acc"]) for r in metrics(two, "lora") if r.get("event") == "eval"]
    assert len(scored) == 2 and scored == [(r["step"], r["items"], r["acc"]) for r in metrics(tmp_path / "one", "lora")
                                           if r.get("event") == "eval"]
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


def test_fsdp_sharded_base_in_bf16_with_checkpointing_equals_one_process(setup, tmp_path):
    ok(setup["results"]["fsdp"])
    assert "FSDP: the base is sharded over 2 processes (2 decoder layers)" in setup["results"]["fsdp"][0]["stderr"]
    one_process(setup, "plain", tmp_path / "one", "--dtype", "bf16")
    assert_close_weights(setup["out"]["fsdp"], tmp_path / "one", ["lora", "mix"])
    assert eval_table(setup["out"]["fsdp"]) == eval_table(tmp_path / "one")


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(setup, tmp_path, monkeypatch):
    ok(setup["results"]["nan"])
    import mlora.train.trainer as trainer
    from tests.train.distributed_harness import nan_loss_at

    monkeypatch.setattr(trainer, "adapter_loss", nan_loss_at("lora", 0, 1, 1))  # the same micro-batch, 1 process
    one_process(setup, "dropout", tmp_path / "one")
    events = [r for r in metrics(setup["out"]["nan"], "lora") if r.get("event")]
    assert [(r["step"], r["event"]) for r in events] == [(2, "nan_loss")]
    assert_close_weights(setup["out"]["nan"], tmp_path / "one", ["lora", "mix"])
    assert_same_logs(setup["out"]["nan"], tmp_path / "one", ["lora", "mix"])


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
        assert [{**r, "seconds": 0} for r in metrics(out, name)] == [{**r, "seconds": 0} for r in metrics(want, name)]


def test_stopped_adapter_parallel_run_resumes_bit_exact(setup):
    assert [r["code"] for r in setup["results"]["adapter-sigint"]] == [130, 130]
    ok(setup["results"]["adapter-resume"])
    out, want = setup["out"]["adapter-sigint"], setup["out"]["adapter"]
    for name in ("a", "b", "c"):
        got, expected = weights(out / name), weights(want / name)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
        assert [{**r, "seconds": 0} for r in metrics(out, name)] == [{**r, "seconds": 0} for r in metrics(want, name)]
    assert eval_table(out) == eval_table(want)


def test_a_rank_that_raises_ends_the_job(setup):
    """Rank 1 raises mid-run: it names itself, rank 0 stops on the lost contact within seconds;
    under torchrun the launcher ends the job with a failure."""
    leader, follower = setup["results"]["raise"]
    assert follower["code"] == 1 and "error: rank 1: RuntimeError: injected failure" in follower["stderr"]
    assert "Traceback" in follower["stderr"]  # a bug's traceback, then the line naming the rank
    assert leader["code"] == 1 and "error: rank 0: lost contact with the other processes" in leader["stderr"]
    assert leader["seconds"] < 60 and not (setup["out"]["raise"] / "lora").exists()

    proc, (leader, follower) = setup["torchrun"], setup["results"]["raise-torchrun"]
    assert proc.returncode != 0
    assert follower["code"] == 1 and "error: rank 1: RuntimeError: injected failure" in follower["stderr"]
    if leader is not None:  # torchrun may end rank 0 before it writes its record
        assert leader["code"] != 0
    seconds = setup["torchrun_end"] - follower["started"]
    assert seconds < 60, f"the job took {seconds:.0f} s to end after the failing run started"


def test_a_relayed_signal_is_not_a_second_one():
    """torchrun passes the terminal's Ctrl-C on to every process that already got it: under
    torchrun a second signal at once is that copy; alone it aborts."""
    from mlora.train.trainer import _interrupt_guard

    with _interrupt_guard(launched=True) as flag:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert flag.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt), _interrupt_guard(launched=False):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)


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


def test_grad_reducer_starts_buckets_during_backward_and_keeps_absent_grads_none():
    """One process of a gloo group: the sum is the gradient itself, so what is checked is the
    mechanics: buckets deepest layer first, launched by gradient hooks while backward runs,
    gradients written back, a parameter without a gradient left at None."""
    from mlora.train.distributed import GradReducer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = World(0, 1, 0, "gloo", 60.0, dist.new_group(backend="gloo"))
        torch.manual_seed(0)
        layers = [torch.nn.Linear(4, 4, bias=False) for _ in range(3)]
        unused = torch.nn.Parameter(torch.ones(2))
        params = {"model.layers.0.proj.weight": layers[0].weight, "model.layers.0.unused": unused,
                  "model.layers.1.proj.weight": layers[1].weight, "model.layers.2.proj.weight": layers[2].weight}
        reducer = GradReducer(world, bucket_bytes=64)  # one 4 x 4 fp32 weight per bucket
        reducer.add("a", params)
        launched_when_first_layer_done = []
        layers[0].weight.register_post_accumulate_grad_hook(lambda p: launched_when_first_layer_done.append(
            reducer._next))
        h = torch.randn(2, 4)
        for layer in layers:
            h = layer(h)
        reducer.arm(["a"])
        h.square().sum().backward()
        # Layers 2 and 1 went out while backward ran; `unused` (never ready) holds the rest back.
        assert launched_when_first_layer_done == [2]
        expected = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
        reducer.finish()
        assert unused.grad is None
        for key, grad in expected.items():
            assert torch.equal(params[key].grad, grad)
        reducer.remove("a")
        assert not reducer._owner
    finally:
        dist.destroy_process_group()


def test_adapter_cost_weighs_tokens_epochs_and_method():
    from types import SimpleNamespace

    from mlora.config import LoraConfig, MixLoraConfig
    from mlora.train.dispatcher import METHOD_COST, adapter_cost

    prepared = SimpleNamespace(examples=[SimpleNamespace(input_ids=[1] * 10), SimpleNamespace(input_ids=[1] * 6)])
    assert adapter_cost(LoraConfig(name="a", num_epochs=3), prepared) == 16 * 3
    assert adapter_cost(MixLoraConfig(name="m", num_epochs=1), prepared) == 16 * METHOD_COST["mixlora"]
    assert adapter_cost(LoraConfig(name="d", use_dora=True), prepared) == 16 * 2 * METHOD_COST["dora"]


def test_bench_torchrun_flag_and_report():
    from bench import train_throughput as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--torchrun", "1"])
    one = {"config": "lora", "dtype": "fp32", "status": "ok", "tokens_per_s": 100.0, "step_time_s": 0.9,
           "adapters": 1, "rows_per_adapter": 4, "tokens_vs_peft": None, "peak_mem_mb": 1.0,
           "mem_before_steps_mb": 1.0, "achieved_gflops": 1.0, "mfu": None}
    two = {"config": "lora", "dtype": "fp32", "status": "ok", "processes": 2, "rows_per_process": 2,
           "step_time_s": 0.5, "tokens_per_s": 180.0, "allreduce_share": 0.04}
    lines = bench.format_report({
        "settings": {"shape": "nano", "seq": 8, "micro_batch": 4, "steps": 1, "warmup": 0, "device": "cpu",
                     "threads": 2, "grad_ckpt": False, "lora_dropout": 0.0, "torchrun": 2},
        "machine": {"git": None, "cpu": "cpu", "logical_cpus": 2, "torch": "2", "transformers": "5", "peft": "0"},
        "load_before": None, "load_after": None, "matmul_peak_gflops": {}, "results": [one],
        "distributed": [two], "targets": []}).splitlines()
    row = next(line for line in lines if line.startswith("lora") and " 2 " in line and "%" in line)
    assert row.split()[-3:] == ["1.80", "4.0%", "-"]  # vs 1 process, all-reduce share, other CPU


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fsdp_data_parallel_on_two_gpus(base_model, tmp_path, no_compile):
    """NCCL and FSDP2 on CUDA (never run on the CPU machines): 2 GPUs, the base sharded, bf16
    with checkpointing, against 1 GPU. CUDA kernels may add in any order: a looser bound."""
    arc = str(FIXTURES / "arc-e")
    cfg = write_config(tmp_path / "c.json", [lora("lora", arc), mixlora("mix", arc)])
    extra = ("--device", "cuda", "--dtype", "bf16", "--gradient_checkpointing")
    [records] = run_session([scenario(cfg, base_model, tmp_path / "two", *extra, "--fsdp")], tmp_path / "records")
    ok(records)
    assert main(argv(cfg, base_model, tmp_path / "one", *extra)) == 0
    assert_close_weights(tmp_path / "two", tmp_path / "one", ["lora", "mix"], atol=1e-3)
    assert eval_table(tmp_path / "two") == eval_table(tmp_path / "one")
