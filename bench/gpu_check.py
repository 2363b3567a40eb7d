"""One prepared GPU check: install, versions, the Llama-2-7B-shape step, the CUDA tests, the rest.

    bash bench/gpu_check.sh OUT_DIR                  # a CUDA machine: at most 8 minutes in all
    bash bench/gpu_check.sh --dry-run OUT_DIR        # CPU, nano shapes, Triton interpreted, no pip
    python bench/gpu_check.py --budget 600 --only llama7b-bf16,tests OUT_DIR

The parts run in order of importance (`PARTS`), each under its own time limit inside one
global budget; a part that fails or runs out of time is recorded as such and the next one
starts, and a part that no longer fits is recorded as not run. Training figures come from the
harness of `train_throughput.py` / `workload.py`: one configuration per fresh process (peak
memory reset per configuration), bf16 base, seq 512, micro-batch 4, r 8 on all seven
projections, MixLoRA 8 experts top-2. The dry run keeps every part but runs a part's
configurations in one process, on the `nano` shape, so that it takes about a minute of CPU.

Writes OUT_DIR/gpu_check.json (rewritten after every part, so a run cut short keeps what it
measured), OUT_DIR/gpu_check.md, OUT_DIR/constraints.txt (what pip may not replace) and one
log per part under OUT_DIR/logs/. Exit status 0 when every part that ran succeeded, 1 if one
did not, 2 for bad flags, 130 when interrupted. This file imports no torch: the install part
may have to put it in place first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/gpu_check.py`
    sys.path.insert(0, str(ROOT))

from bench.subproc import run_limited
from bench.train_throughput import add_derived, machine_info, run_worker

DEFAULT_BUDGET_S = 480.0
REPORT_RESERVE_S = 5.0      # kept back from the budget for writing the report
PROBE_TIMEOUT_S = 90.0      # one `python -c` that imports torch and asks CUDA about the card
INSTALL_TIMEOUT_S = 240.0   # all pip calls together (a CUDA torch download, when none is present)
GIB = 1024.0                # MiB per GiB: peak figures are MiB
VERSIONED = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "mixlora", "pytest")


@dataclass(frozen=True)
class TrainPart:
    """Configurations of one model shape, timed by the bench harness."""

    shape: str
    configs: tuple[str, ...]
    grad_ckpt: bool
    quant: str | None
    steps: int
    warmup: int
    config_timeout_s: float


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    timeout_s: float            # on the GPU; the dry run's limits are `DRY_TIMEOUT_S`
    train: TrainPart | None = None


PARTS = (
    Part("setup", "install the project, print the versions and the GPU", INSTALL_TIMEOUT_S + PROBE_TIMEOUT_S),
    Part("llama7b-bf16", "Llama-2-7B shape, bf16 base, gradient checkpointing", 420,
         TrainPart("llama7b", ("mixlora", "lora", "peft", "mixlora-ref"), True, None, 5, 2, 150)),
    Part("peak", "measured bf16 matmul peak (the MFU denominator)", 60),
    Part("tests", "pytest -m gpu; the Triton kernel tests compiled", 200),
    Part("llama7b-4bit", "Llama-2-7B shape, 4-bit NF4 base, gradient checkpointing", 150,
         TrainPart("llama7b", ("mixlora",), True, "4bit", 4, 2, 150)),
    Part("medium-bf16", "medium shape, bf16 base", 180,
         TrainPart("medium", ("lora", "peft", "mixlora", "mixlora-ref"), False, None, 10, 3, 75)),
)
PART_NAMES = tuple(p.name for p in PARTS)
DRY_TIMEOUT_S = 120.0


@dataclass
class Mode:
    """Where and how big: the GPU run, or the dry run on CPU."""

    dry: bool
    device: str
    seq: int
    micro_batch: int
    peak_sizes: tuple[int, ...]
    threads: int
    min_start_s: float          # a part or configuration with less time left than this is not started

    @classmethod
    def of(cls, dry: bool) -> Mode:
        if dry:
            return cls(True, "cpu", 32, 4, (64, 128), 1, 3.0)
        return cls(False, "cuda", 512, 4, (4096, 8192), len(os.sched_getaffinity(0)), 20.0)


@dataclass
class Run:
    """The state of one check, written to JSON after every part."""

    mode: Mode
    out: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    report: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - REPORT_RESERVE_S - (time.monotonic() - self.started)

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.mode.dry:
            env["TRITON_INTERPRET"] = "1"
            env["MLORA_COMPILE"] = "0"  # torch.compile serves the CPU experts only; a GPU takes Triton
        else:
            env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
        return env

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None):
        with open(self.log(name), "a") as f:
            f.write(f"\n$ {' '.join(cmd)}    # {_now()}, limit {timeout:.0f} s\n")
        return run_limited(cmd, timeout, env=env or self.env(), cwd=ROOT, log=self.log(name))


# ----------------------------------------------------------------------------- flags
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="Folder for gpu_check.json, gpu_check.md and logs/.")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, nano shapes, Triton interpreted, no pip: checks the script itself.")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help=f"Global time limit (default {DEFAULT_BUDGET_S:.0f} s, dry run {DRY_TIMEOUT_S * 2:.0f} s).")
    p.add_argument("--only", default=",".join(PART_NAMES), help=f"Comma-separated parts: {', '.join(PART_NAMES)}.")
    p.add_argument("--no-install", action="store_true", help="Skip pip; use what is installed.")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    problems = [f"--only: unknown part {s!r} (valid: {', '.join(PART_NAMES)})" for s in args.only
                if s not in PART_NAMES]
    if args.budget is None:
        args.budget = DRY_TIMEOUT_S * 2 if args.dry_run else DEFAULT_BUDGET_S
    if args.budget <= REPORT_RESERVE_S:
        problems.append(f"--budget must be more than {REPORT_RESERVE_S:.0f} s")
    if problems:
        p.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------- setup
def constraint_lines(present: dict) -> list[str]:
    """Pins for pip: the torch (and triton) already installed must stay, whatever the extras ask."""
    return [f"{name}=={present[name]}" for name in ("torch", "triton") if present.get(name)]


def installed_versions() -> dict:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


TORCH_PROBE = """
import json, os, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET")}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                gpu_memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
print("PROBE " + json.dumps(info))
"""


def probe_torch(run: Run, limit: float) -> dict:
    """What torch sees (version, CUDA, the card), from a fresh interpreter; ``{}`` when torch does not import."""
    done = run.run("setup", [sys.executable, "-c", TORCH_PROBE], limit)
    text = run.log("setup").read_text()
    lines = [line for line in text.splitlines() if line.startswith("PROBE ")]
    return json.loads(lines[-1][6:]) if done.returncode == 0 and lines else {}


def install(run: Run, constraints: Path, deadline: float) -> dict:
    """`pip install -e .[test]`, never replacing the torch (and triton) present; falls back step by step."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
           "--retries", "1", "--timeout", "20", "-c", str(constraints)]
    # A torch build pinning an older triton than the test extra asks for makes the first attempt
    # unresolvable: then the project alone, then the test tools without triton, then no deps at all.
    attempts = [["-e", ".[test]"], ["-e", "."], ["--no-deps", "-e", "."]]
    record = {"constraints": constraints.read_text().split(), "attempts": []}
    for i, extra in enumerate(attempts):
        limit = deadline - time.monotonic()
        if limit < 5:
            break
        done = run.run("setup", pip + extra, limit)
        record["attempts"].append({"args": extra, "returncode": done.returncode, "timed_out": done.timed_out,
                                   "seconds": round(done.seconds, 1)})
        if done.returncode == 0:
            if i == 1 and deadline - time.monotonic() > 5:
                tools = run.run("setup", pip + ["peft", "pytest", "mixlora==0.2.3"], deadline - time.monotonic())
                record["test_tools_returncode"] = tools.returncode
            record["status"] = "ok" if i == 0 else f"partial: installed with {' '.join(extra)}"
            return record
    record["status"] = "failed: the source tree is used as it is (PYTHONPATH)"
    return record


def part_setup(run: Run, deadline: float, install_pip: bool) -> dict:
    constraints = run.out / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in constraint_lines(installed_versions())))
    if run.mode.dry or not install_pip:
        why = "dry run" if run.mode.dry else "--no-install"
        record = {"status": f"not run ({why})", "constraints": constraints.read_text().split(),
                  "command": "pip install -e .[test] -c constraints.txt"}
        print(f"  install: not run ({why}); would run: {record['command']} with {record['constraints']}")
    else:
        record = install(run, constraints, min(deadline, time.monotonic() + INSTALL_TIMEOUT_S))
        print(f"  install: {record['status']}; pins: {', '.join(record['constraints']) or 'none'}")
    versions = installed_versions()
    probe = probe_torch(run, max(5.0, min(PROBE_TIMEOUT_S, deadline - time.monotonic())))
    smi = None
    if shutil.which("nvidia-smi"):
        fields = "name,driver_version,memory.total,power.limit,clocks.max.sm"
        done = run_limited(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], 30)
        smi = done.output.strip() if done.returncode == 0 else f"nvidia-smi failed ({done.returncode})"
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"  torch sees: {json.dumps(probe)}")
    print(f"  nvidia-smi: {smi or 'not found'}")
    run.report["machine"].update(versions=versions, torch_probe=probe, nvidia_smi=smi, install=record)
    if not probe:
        return {"status": "failed", "reason": "torch does not import (see logs/setup.log)"}
    if not run.mode.dry and not probe.get("cuda_available"):
        return {"status": "failed", "reason": f"torch {probe['torch']} sees no CUDA device (a CPU build? then "
                                              "install the CUDA build for this driver and rerun)"}
    installed = record["status"] == "ok" or record["status"].startswith("not run")
    return {"status": "ok", "reason": None if installed else f"install {record['status']}"}


# ----------------------------------------------------------------------------- measuring
def part_peak(run: Run, deadline: float) -> dict:
    job = {"kind": "peak", "dtypes": ["bf16"], "sizes": list(run.mode.peak_sizes), "device": run.mode.device,
           "threads": run.mode.threads}
    r = run_worker(job, isolate=True, timeout=deadline - time.monotonic(), env=run.env())
    peaks = {p["dtype"]: p["gflops"] for p in r.get("peaks", [])}
    run.report["matmul_peak_gflops"] = peaks
    run.report["matmul_peak_detail"] = r.get("peaks", [])
    if not peaks:
        return {"status": r.get("status", "error"), "reason": r.get("reason")}
    print(f"  bf16 matmul peak: {_flops(peaks['bf16'])}")
    return {"status": "ok"}


def train_jobs(run: Run, part: Part) -> list[dict]:
    t, m = part.train, run.mode
    return [dict(kind="train", config=c, shape="nano" if m.dry else t.shape, dtype="bf16", seq=m.seq,
                 micro_batch=m.micro_batch, steps=1 if m.dry else t.steps, warmup=1 if m.dry else t.warmup,
                 device=m.device, threads=m.threads, grad_ckpt=t.grad_ckpt, quant=t.quant, lora_dropout=0.05,
                 seed=0, profile_dir=None, part=part.name) for c in t.configs]


def part_train(run: Run, part: Part, deadline: float) -> dict:
    """Each configuration in its own process (the dry run: all of them in one), each under its limit."""
    jobs = train_jobs(run, part)
    results = run.report["results"].setdefault(part.name, [])
    if run.mode.dry:
        r = run_worker({"kind": "batch", "jobs": jobs}, isolate=True, timeout=deadline - time.monotonic(),
                       env=run.env())
        got = r.get("results") or [{"config": j["config"], "status": r.get("status"), "reason": r.get("reason")}
                                   for j in jobs]
        results += [{**x, "part": part.name} for x in got]
    else:
        for job in jobs:
            left = deadline - time.monotonic()
            if left < run.mode.min_start_s:
                results.append({"config": job["config"], "part": part.name, "status": "not run",
                                "reason": "the part's time ran out"})
                continue
            r = run_worker(job, isolate=True, timeout=min(part.train.config_timeout_s, left), env=run.env())
            results.append({**r, "part": part.name})
            _print_result(results[-1])
            write_report(run)
    if run.mode.dry:
        for r in results:
            _print_result(r)
    bad = [r["config"] for r in results if r.get("status") != "ok"]
    return {"status": "ok"} if not bad else {"status": "failed", "reason": "not measured: " + ", ".join(bad)}


def _print_result(r: dict) -> None:
    if r.get("status") == "ok":
        print(f"  {r['config']}: step {r['step_time_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s, "
              f"peak {r['peak_mem_mb'] / GIB:.2f} GiB", flush=True)
    else:
        print(f"  {r.get('config')}: {r.get('status')}: {r.get('reason')}", flush=True)


def junit_counts(path: Path) -> dict:
    """Totals of a pytest ``--junitxml`` file, and the ids of what failed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"], "failed_tests": failed[:20]}


def part_tests(run: Run, deadline: float) -> dict:
    """The Triton kernel tests (compiled on CUDA), then every ``gpu``-marked test."""
    # A test module that fails to import (a missing test tool) must not cost the others.
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
              "--continue-on-collection-errors"]
    # The Triton file runs whole (its gpu-marked tests included), so the second run leaves it out.
    # The dry run keeps one family of the interpreted kernel tests (the whole file runs in the suite
    # anyway) and collects only the files that use the marker: importing every test module costs more.
    triton_file = "tests/kernels/test_triton.py"
    triton_args = [triton_file] + (["-k", "segmented"] if run.mode.dry else [])
    gpu_files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                       if "mark.gpu" in f.read_text() and f != ROOT / triton_file)
    gpu_args = ["-m", "gpu"] + (gpu_files if run.mode.dry else ["tests", f"--ignore={triton_file}"])
    suites = [("triton", triton_args), ("gpu", gpu_args)]
    records = run.report["tests"]
    for name, args in suites:
        left = deadline - time.monotonic()
        if left < run.mode.min_start_s:
            records[name] = {"status": "not run", "reason": "the part's time ran out"}
            continue
        xml = run.out / "logs" / f"tests-{name}.xml"
        xml.unlink(missing_ok=True)  # ours, from an earlier run into this folder
        done = run.run("tests", pytest + args + [f"--junitxml={xml}"], left)
        rec = {"command": "python -m pytest " + " ".join(args), "seconds": round(done.seconds, 1),
               "triton_interpret": run.env().get("TRITON_INTERPRET") == "1"}
        if xml.exists():
            rec.update(junit_counts(xml))
        if done.timed_out:
            rec["status"] = "timeout"
        elif done.returncode == 0:
            rec["status"] = "ok"
        else:
            rec["status"] = f"failed (pytest status {done.returncode})"
        records[name] = rec
        print(f"  {name}: {rec['status']}, {rec.get('passed', '?')} passed, {rec.get('failed', '?')} failed, "
              f"{rec.get('skipped', '?')} skipped, {rec['seconds']:.0f} s", flush=True)
    bad = [n for n, r in records.items() if r["status"] != "ok"]
    return {"status": "ok"} if not bad else {"status": "failed", "reason": "not passed: " + ", ".join(bad)}


# ----------------------------------------------------------------------------- targets
def _ok(results: list[dict], config: str) -> dict | None:
    return next((r for r in results if r.get("config") == config and r.get("status") == "ok"), None)


def evaluate_targets(results: dict[str, list[dict]]) -> list[dict]:
    """The GPU targets (DESIGN.md section 7), each met / not met / not run on the measured figures."""
    rows = []

    def add(target, part, value, goal, at_least):
        if value is None or not math.isfinite(value):
            verdict = "not run"
        else:
            verdict = "met" if (value >= goal if at_least else value <= goal) else "not met"
        rows.append({"target": target, "part": part, "value": value,
                     "goal": f"{'>=' if at_least else '<='} {goal}", "verdict": verdict})

    def ratio(a, b, key):
        return a[key] / b[key] if a and b else None

    b7 = results.get("llama7b-bf16", [])
    mix = _ok(b7, "mixlora")
    add("MixLoRA peak memory, bf16 base, 4 x 512, gradient checkpointing (GiB)", "llama7b-bf16",
        mix["peak_mem_mb"] / GIB if mix else None, 24, False)
    q4 = _ok(results.get("llama7b-4bit", []), "mixlora")
    add("MixLoRA peak memory, 4-bit base (GiB)", "llama7b-4bit", q4["peak_mem_mb"] / GIB if q4 else None, 12, False)
    for part in ("llama7b-bf16", "medium-bf16"):
        rs = results.get(part, [])
        lora, mix, ref, peft = (_ok(rs, c) for c in ("lora", "mixlora", "mixlora-ref", "peft"))
        add("MixLoRA step time / our LoRA step time", part, ratio(mix, lora, "step_time_s"), 1.3, False)
        add("per-expert reference step time / MixLoRA step time", part, ratio(ref, mix, "step_time_s"), 1.4, True)
        add("MixLoRA peak memory / per-expert reference peak memory", part, ratio(mix, ref, "peak_mem_mb"), 0.7, False)
        add("our LoRA tokens/s / peft LoRA tokens/s", part, ratio(lora, peft, "tokens_per_s"), 1.1, True)
        add("our LoRA MFU (vs the measured bf16 matmul peak)", part, lora.get("mfu") if lora else None, 0.5, True)
    return rows


# ----------------------------------------------------------------------------- report
def write_report(run: Run) -> None:
    """Derived figures and targets from what is measured so far; JSON and markdown, both rewritten."""
    rep = run.report
    peaks = rep.get("matmul_peak_gflops", {})
    for results in rep["results"].values():
        add_derived(results, peaks)
    rep["targets"] = evaluate_targets(rep["results"])
    rep["wall_s"] = round(time.monotonic() - run.started, 1)
    (run.out / "gpu_check.json").write_text(json.dumps(rep, indent=2))
    (run.out / "gpu_check.md").write_text(format_markdown(rep))


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _flops(gflops: float | None) -> str:
    if gflops is None:
        return "-"
    return f"{gflops / 1e3:.1f} TFLOP/s" if gflops >= 1e3 else f"{gflops:.1f} GFLOP/s"


def format_markdown(rep: dict) -> str:
    m = rep["machine"]
    probe, versions = m.get("torch_probe") or {}, m.get("versions") or {}
    gpu = (f"{probe['gpu']} ({probe['gpu_memory_gib']} GiB, compute capability {probe['capability']})"
           if probe.get("gpu") else "no CUDA device")
    lines = ["# GPU check" + (" (dry run)" if rep["dry_run"] else ""), ""]
    if rep["dry_run"]:
        lines += ["Dry run: CPU, nano shapes, Triton interpreted. The figures test this script, not the engine;",
                  "the verdicts below are computed on them only to exercise the report.", ""]
    peak = rep.get("matmul_peak_gflops", {}).get("bf16")
    lines += [f"- started {rep['started_at']}, code {m.get('git')}, `{rep['command']}`",
              f"- {gpu}; nvidia-smi: {m.get('nvidia_smi') or '-'}",
              f"- torch {probe.get('torch') or versions.get('torch')} (CUDA {probe.get('torch_cuda')}), "
              + ", ".join(f"{k} {versions.get(k)}" for k in VERSIONED if k != "torch")
              + f", Python {m.get('python')}",
              f"- budget {rep['budget_s']:.0f} s, wall {rep['wall_s']:.0f} s; bf16 matmul peak {_flops(peak)}",
              "", "| part | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {_f(p.get('seconds'), '.0f')} | {p.get('reason') or p['title']} |"
              for p in rep["parts"]]
    s = rep["settings"]
    lines += ["", (f"Training steps: bf16 base, seq {s['seq']}, micro-batch {s['micro_batch']}, r 8 on all seven "
                   "projections, MixLoRA 8 experts top-2; peak = `max_memory_allocated` over the timed steps (CPU: "
                   "RSS); MFU counts 4 x base parameters FLOPs per token (recomputation under checkpointing not "
                   "counted)."), "",
              "| part | config | step s | vs LoRA step | tokens/s | vs peft | peak GiB | reserved GiB | MFU | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for part, results in rep["results"].items():
        lora = _ok(results, "lora")
        for r in results:
            if r.get("status") != "ok":
                lines.append(f"| {part} | {r.get('config')} | - | - | - | - | - | - | - | "
                             f"{r.get('status')}: {(r.get('reason') or '')[:100]} |")
                continue
            reserved = r.get("peak_reserved_mb")
            vs_lora = r["step_time_s"] / lora["step_time_s"] if lora else None
            lines.append(f"| {part} | {r['config']} | {r['step_time_s']:.3f} | {_f(vs_lora, '.2f')} | "
                         f"{r['tokens_per_s']:.0f} | {_f(r.get('tokens_vs_peft'), '.2f')} | "
                         f"{r['peak_mem_mb'] / GIB:.2f} | "
                         f"{'-' if reserved is None else format(reserved / GIB, '.2f')} | "
                         f"{'-' if r.get('mfu') is None else format(100 * r['mfu'], '.1f') + ' %'} | |")
    lines += ["", "| tests | status | passed | failed | skipped | seconds |", "|---|---|---|---|---|---|"]
    for name, t in rep["tests"].items():
        lines.append(f"| {t.get('command', name)} | {t['status']} | {t.get('passed', '-')} | {t.get('failed', '-')} | "
                     f"{t.get('skipped', '-')} | {_f(t.get('seconds'), '.0f')} |")
    lines += ["", "| target | part | measured | goal | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['part']} | {_f(t['value'], '.3f')} | {t['goal']} | {t['verdict']} |"
              for t in rep["targets"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def part_limit(run: Run, part: Part) -> float:
    return min(DRY_TIMEOUT_S if run.mode.dry else part.timeout_s, run.left())


def run_part(run: Run, part: Part, args) -> dict:
    deadline = time.monotonic() + part_limit(run, part)
    if part.name == "setup":
        return part_setup(run, deadline, not args.no_install)
    if part.name == "peak":
        return part_peak(run, deadline)
    if part.name == "tests":
        return part_tests(run, deadline)
    return part_train(run, part, deadline)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = Mode.of(args.dry_run)
    out = Path(args.out_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run = Run(mode, out, args.budget)
    run.report = {
        "command": "bash bench/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
        "dry_run": mode.dry, "started_at": _now(), "budget_s": args.budget,
        "settings": {"device": mode.device, "seq": mode.seq, "micro_batch": mode.micro_batch, "dtype": "bf16",
                     "peak_sizes": list(mode.peak_sizes), "threads": mode.threads},
        "machine": {**machine_info(mode.device, mode.threads), "versions": installed_versions()},
        "parts": [{"name": p.name, "title": p.title, "status": "not run", "reason": "not selected (--only)"}
                  for p in PARTS],
        "matmul_peak_gflops": {}, "results": {},
        "tests": {name: {"status": "not run"} for name in ("triton", "gpu")},
    }
    print(f"GPU check{' (dry run)' if mode.dry else ''}: budget {args.budget:.0f} s, writing to {out}", flush=True)
    status = 0
    no_cuda = False
    for part, record in zip(PARTS, run.report["parts"]):
        if part.name not in args.only:
            continue
        if no_cuda and part.name != "setup":
            record.update(status="skipped", reason="no CUDA device visible to torch")
            continue
        if run.left() < mode.min_start_s:
            record.update(status="not run", reason="the time budget was spent")
            status = 1
            continue
        print(f"[{part.name}] {part.title} (limit {part_limit(run, part):.0f} s)", flush=True)
        begun = time.monotonic()
        try:
            outcome = run_part(run, part, args)
        except KeyboardInterrupt:
            record.update(status="interrupted", reason="stopped by a signal", seconds=time.monotonic() - begun)
            write_report(run)
            print("interrupted; the report holds what was measured", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 -- a broken part must not stop the parts after it
            outcome = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
        record.update(status=outcome["status"], reason=outcome.get("reason"),
                      seconds=round(time.monotonic() - begun, 1))
        if outcome["status"] != "ok":
            status = 1
            print(f"  -> {outcome['status']}: {outcome.get('reason')}", flush=True)
        if part.name == "setup":
            no_cuda = not mode.dry and outcome["status"] != "ok"
        write_report(run)
    write_report(run)
    print()
    print((out / "gpu_check.md").read_text())
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {run.report['wall_s']:.0f} s")
    return status


if __name__ == "__main__":
    # The process entry point owns the signal handlers (main() is also called from tests).
    signal.signal(signal.SIGTERM, _interrupted)
    sys.exit(main())
