"""Smoke tests of the training-throughput harness (bench/train_throughput.py).

Only structure is checked, never timings: the tiny shape trains 1-2 steps per
configuration and the report must list every configuration with positive figures.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import train_throughput as bench

ROOT = Path(__file__).resolve().parents[1]
# One thread: on a shared 2-core machine two OpenMP threads can stall for whole time slices.
QUICK = ["--shape", "tiny", "--seq", "16", "--steps", "1", "--warmup", "1", "--threads", "1",
         "--peak-sizes", "64"]
POSITIVE = ("step_time_s", "tokens_per_s", "peak_mem_mb", "model_flops_per_token", "achieved_gflops",
            "mfu", "trainable_params", "matmul_params")


def _check_results(report, configs, dtypes):
    results = report["results"]
    assert {(r["config"], r["dtype"]) for r in results} == {(c, d) for c in configs for d in dtypes}
    for r in results:
        assert r["status"] == "ok", r
        for key in POSITIVE:
            assert r[key] > 0, (r["config"], r["dtype"], key)
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["adapters"] * r["rows_per_adapter"] == r["micro_batch"]
    assert set(report["matmul_peak_gflops"]) == set(dtypes)
    assert all(g > 0 for g in report["matmul_peak_gflops"].values())


def test_all_configurations_in_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(QUICK + ["--no-isolate", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    _check_results(report, bench.CONFIGS, ["fp32", "bf16"])
    by_name = {(r["config"], r["dtype"]): r for r in report["results"]}
    assert by_name[("lora-k4", "fp32")]["adapters"] == 4
    assert by_name[("lora-k4", "fp32")]["rows_per_adapter"] == 1
    # Same model shape for every configuration: the useful FLOPs per token agree.
    assert len({r["model_flops_per_token"] for r in report["results"]}) == 1
    # MixLoRA trains routers and 8 experts' LoRA on top of the attention LoRA.
    assert by_name[("mixlora", "fp32")]["trainable_params"] > by_name[("lora", "fp32")]["trainable_params"]
    assert by_name[("peft", "fp32")]["trainable_params"] == by_name[("lora", "fp32")]["trainable_params"]
    targets = report["targets"]
    assert len(targets) == 11 and all(t["status"] in ("PASS", "FAIL") for t in targets)
    screen = capsys.readouterr().out
    assert "mixlora-ref" in screen and "targets" in screen


def test_profile_writes_op_tables(tmp_path):
    prof = tmp_path / "prof"
    args = QUICK + ["--no-isolate", "--only", "lora,mixlora", "--dtypes", "fp32", "--profile", str(prof)]
    assert bench.main(args) == 0
    files = sorted(p.name for p in prof.iterdir())
    assert files == ["tiny-fp32-seq16-b4-lora.txt", "tiny-fp32-seq16-b4-mixlora.txt"]
    text = (prof / "tiny-fp32-seq16-b4-mixlora.txt").read_text()
    assert "## backward" in text and "## ffn fwd (MixLoraFFN)" in text


def test_targets_pass_fail_and_missing():
    def row(config, dtype, tokens, step, mem, mfu):
        return dict(config=config, dtype=dtype, status="ok", tokens_per_s=tokens, step_time_s=step,
                    peak_mem_mb=mem, mfu=mfu)

    results = [row("peft", "fp32", 100.0, 1.0, 1000.0, 0.3), row("lora", "fp32", 120.0, 0.8, 1000.0, 0.7),
               row("mixlora", "fp32", 80.0, 1.2, 1200.0, 0.5), row("lora", "bf16", 150.0, 0.6, 600.0, 0.2)]
    got = {(t["target"].split()[0] + " " + t["target"].split()[1], t["dtype"]): (t["status"], t["value"])
           for t in bench.evaluate_targets(results, ["fp32", "bf16"])}
    assert got[("our LoRA", "fp32")] == ("PASS", 1.2)
    assert got[("MixLoRA step", "fp32")] == ("FAIL", pytest.approx(1.5))        # 1.2 s / 0.8 s > 1.2
    assert got[("MixLoRA peak", "fp32")] == ("FAIL", 1.2)         # 1200 / 1000 > 1.15
    assert got[("K=4 tokens/s", "fp32")] == ("n/a", None)         # lora-k4 not measured
    assert got[("LoRA MFU", "fp32")] == ("PASS", 0.7)
    assert got[("bf16 LoRA", "both")] == ("FAIL", 1.25)           # 150 / 120 < 1.5
    assert got[("our LoRA", "bf16")] == ("n/a", None)             # no bf16 peft


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "lora,mixlroa", "--dtypes", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'mixlroa'" in err and "'fp16'" in err


def test_a_worker_past_its_limit_comes_back_as_timeout():
    job = {"kind": "peak", "dtypes": ["fp32"], "sizes": [64], "device": "cpu", "threads": 1}
    r = bench.run_worker(job, isolate=True, timeout=0.5)
    assert r["status"] == "timeout" and "limit of 0.5 s" in r["reason"]


@pytest.mark.slow
def test_command_line_isolated_workers(tmp_path):
    """The real command: the peak and each configuration in their own processes."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), *QUICK,
           "--only", "lora,lora-k2", "--dtypes", "fp32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["isolated_processes"] is True
    _check_results(report, ["lora", "lora-k2"], ["fp32"])
    assert "lora-k2" in proc.stdout
