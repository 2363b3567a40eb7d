"""The prepared GPU check (bench/gpu_check.py): its dry run end to end, and its pure parts.

The dry run is the same script on CPU with tiny shapes and the Triton interpreter; it must
record every part, finite figures and a verdict for every target, so that the first run on a
lent GPU is not also the script's first run. Figures are checked for shape, never for speed.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import gpu_check
from bench.subproc import run_limited

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("step_time_s", "tokens_per_s", "peak_mem_mb", "achieved_gflops", "mfu")


def test_dry_run_writes_every_part_figure_and_verdict(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # A generous budget: a busy CI machine must not turn into "not run" parts; the dry run takes about a minute.
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--budget", "400", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["settings"]["device"] == "cpu"
    assert [p["name"] for p in report["parts"]] == list(gpu_check.PART_NAMES)
    assert all(p["status"] == "ok" for p in report["parts"]), report["parts"]

    train_parts = {p.name: p.train for p in gpu_check.PARTS if p.train}
    assert set(report["results"]) == set(train_parts)
    for name, part in train_parts.items():
        results = report["results"][name]
        assert [r["config"] for r in results] == list(part.configs)
        for r in results:
            assert r["status"] == "ok", r
            assert r["grad_ckpt"] == part.grad_ckpt and r["quant"] == part.quant and r["dtype"] == "bf16"
            for key in FIGURES:
                assert math.isfinite(r[key]) and r[key] > 0, (name, r["config"], key)
            assert all(math.isfinite(x) for x in r["losses"])
    assert report["matmul_peak_gflops"]["bf16"] > 0

    tests = report["tests"]
    assert tests["triton"]["status"] == "ok" and tests["triton"]["triton_interpret"]
    if importlib.util.find_spec("triton") is not None:  # the test extra has it on Linux x86_64, Python 3.11+
        assert tests["triton"]["passed"] > 0
    assert tests["gpu"]["status"] == "ok" and tests["gpu"]["skipped"] > 0 and tests["gpu"]["failed"] == 0

    targets = report["targets"]
    assert len(targets) == 12
    assert all(t["verdict"] in ("met", "not met") and math.isfinite(t["value"]) for t in targets), targets

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (dry run)")
    for name in gpu_check.PART_NAMES:
        assert f"| {name} | ok |" in md
    assert "| target | part | measured | goal | verdict |" in md and "mixlora-ref" in md
    assert "torch==" in (out / "constraints.txt").read_text() and "install: not run (dry run)" in proc.stdout
    assert (out / "logs" / "tests.log").exists() and (out / "logs" / "tests-triton.xml").exists()


def _row(config, step, mem, mfu=0.6):
    return {"config": config, "status": "ok", "step_time_s": step, "tokens_per_s": 2048 / step,
            "peak_mem_mb": mem, "mfu": mfu}


def test_targets_met_not_met_and_not_run():
    results = {
        "llama7b-bf16": [_row("mixlora", 1.2, 20 * 1024), _row("lora", 1.0, 18 * 1024, mfu=0.45),
                         _row("peft", 1.2, 19 * 1024), _row("mixlora-ref", 2.0, 40 * 1024)],
        "llama7b-4bit": [{"config": "mixlora", "status": "timeout", "reason": "still running"}],
    }
    got = {(t["target"], t["part"]): (t["verdict"], t["value"]) for t in gpu_check.evaluate_targets(results)}
    b7 = "llama7b-bf16"
    assert got[("MixLoRA peak memory, bf16 base, 4 x 512, gradient checkpointing (GiB)", b7)] == ("met", 20.0)
    assert got[("MixLoRA peak memory, 4-bit base (GiB)", "llama7b-4bit")] == ("not run", None)
    assert got[("MixLoRA step time / our LoRA step time", b7)] == ("met", pytest.approx(1.2))
    assert got[("per-expert reference step time / MixLoRA step time", b7)] == ("met", pytest.approx(2.0 / 1.2))
    assert got[("MixLoRA peak memory / per-expert reference peak memory", b7)] == ("met", 0.5)
    assert got[("our LoRA tokens/s / peft LoRA tokens/s", b7)] == ("met", pytest.approx(1.2))
    assert got[("our LoRA MFU (vs the measured bf16 matmul peak)", b7)] == ("not met", 0.45)
    assert got[("MixLoRA step time / our LoRA step time", "medium-bf16")] == ("not run", None)


def test_pins_keep_the_present_torch_and_triton():
    assert gpu_check.constraint_lines({"torch": "2.5.1+cu124", "triton": "3.1.0"}) == ["torch==2.5.1+cu124",
                                                                                      "triton==3.1.0"]
    assert gpu_check.constraint_lines({"torch": None, "triton": None}) == []


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="7">
          <testcase classname="tests.a" name="test_ok"/>
          <testcase classname="tests.a" name="test_bad"><failure message="x"/></testcase>
          <testcase classname="tests.b" name="test_broken"><error message="y"/></testcase>
        </testsuite></testsuites>"""))
    assert gpu_check.junit_counts(xml) == {"passed": 3, "failed": 2, "skipped": 2,
                                           "failed_tests": ["tests.a::test_bad", "tests.b::test_broken"]}


def test_a_spent_budget_records_parts_as_not_run(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--budget", "6", "--only", "peak,tests", str(tmp_path)]) == 1
    parts = {p["name"]: p for p in json.loads((tmp_path / "gpu_check.json").read_text())["parts"]}
    assert parts["peak"]["status"] == parts["tests"]["status"] == "not run"
    assert parts["peak"]["reason"] == "the time budget was spent"
    assert parts["setup"]["reason"] == "not selected (--only)"
    assert "| peak | not run |" in (tmp_path / "gpu_check.md").read_text()


def test_bad_part_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--only", "llama7b,tests", str(tmp_path)])
    assert exc.value.code == 2 and "'llama7b'" in capsys.readouterr().err


def test_a_limit_ends_the_child_and_its_children():
    # The grandchild holds the output pipe: if it outlived the limit, reading the output would wait 60 s.
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    done = run_limited([sys.executable, "-c", code], 1.0)
    assert done.timed_out and done.seconds < 20
