"""Training throughput of our LoRA / MixLoRA engine next to plain peft, on one model shape.

    python bench/train_throughput.py                       # medium shape, fp32 and bf16
    python bench/train_throughput.py --shape smollm2 --dtypes bf16 --only lora,mixlora
    python bench/train_throughput.py --only lora,mixlora --profile bench-profiles
    python bench/train_throughput.py --dtypes fp32 --only lora,mixlora --torchrun 2   # + data parallel

Every configuration (see `bench/workload.py`) runs in a fresh Python process so that peak
memory figures do not mix; `--no-isolate` runs them all in this process instead (faster,
used by the smoke test; memory figures then share one process). Before them, a separate
process measures the machine's matmul peak for each dtype, the denominator of MFU.

"Same total batch": `lora-kK` trains K adapters with micro-batch/K rows each in one
forward, `lora` (K = 1) one adapter with all micro-batch rows; both see micro-batch x seq
tokens per step, so their tokens/s compare directly.

`--torchrun N` also trains each of our configurations with N processes under torchrun
(`bench/dist_workload.py`: data parallelism, each process ``micro-batch / N`` rows of the same
global micro-batch, adapter gradients summed by the trainer's `GradReducer`; one thread per
process on the CPU) and reports its tokens/s and the all-reduce share of its step next to the
1-process figure of the same configuration.

This file parses flags, runs the jobs and reports (a table on screen, JSON with `--json`);
it imports no torch itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/train_throughput.py`
    sys.path.insert(0, str(ROOT))

from bench.interference import cpu_seconds, other_cpu_share, wait_for_quiet
from bench.subproc import run_limited

CONFIGS = ("peft", "lora", "lora-k2", "lora-k4", "mixlora", "mixlora-ref")
SHAPE_NAMES = ("nano", "tiny", "medium", "smollm2", "llama7b-2l", "llama7b")
QUIET = 0.05  # other processes' CPU share under which a machine counts as quiet
TARGET_NOTE = "targets are stated for the medium shape, seq 256, micro-batch 4, fp32"


# ----------------------------------------------------------------------------- flags
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=SHAPE_NAMES, default="medium", help="Random-weight Llama shape.")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="Comma-separated: fp32, bf16 (bf16 base weights, fp32 adapters, no autocast).")
    p.add_argument("--only", default=",".join(CONFIGS),
                   help=f"Comma-separated configurations: {', '.join(CONFIGS)} (any lora-kK works).")
    p.add_argument("--seq", type=int, default=256, help="Sequence length.")
    p.add_argument("--micro-batch", type=int, default=4, help="Rows per step (split over K adapters).")
    p.add_argument("--steps", type=int, default=6, help="Timed steps (the median counts).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N.")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads.")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (ours and peft).")
    p.add_argument("--grad-ckpt", action="store_true", help="Gradient checkpointing (ours and peft).")
    p.add_argument("--quant", choices=["4bit"],
                   help="Base decoder layers in bitsandbytes NF4 (compute dtype: --dtypes).")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="Stop a configuration's process after SECONDS (status 'timeout'); isolated runs only.")
    p.add_argument("--peak-sizes", default="1024,2048,4096", help="Square matmul sizes for the peak.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="Write all results as JSON here.")
    p.add_argument("--profile", metavar="DIR", nargs="?", const="bench-profiles",
                   help="After timing, profile 2 steps per configuration; write op tables to DIR.")
    p.add_argument("--no-isolate", action="store_true", help="Run every configuration in this process.")
    p.add_argument("--torchrun", type=int, default=0, metavar="N",
                   help="Also train our configurations with N processes under torchrun (data parallelism, the same "
                        "global batch; 1 thread per process on the CPU) and report them next to 1 process.")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="Before each configuration, wait up to SECONDS until other processes use under 5%% "
                        "of the CPUs for 15 s (shared machines).")
    p.add_argument("--retries", type=int, default=0,
                   help="Rerun a configuration up to this many times while other processes took over 5%% "
                        "of the CPUs during its timed steps; the quietest attempt is kept.")
    args = p.parse_args(argv)

    problems = []
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    problems += [f"--dtypes: unknown dtype {d!r} (fp32, bf16)" for d in args.dtypes if d not in ("fp32", "bf16")]
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    problems += [f"--only: unknown configuration {c!r} (valid: {', '.join(CONFIGS)}, lora-kK)"
                 for c in args.only if c not in CONFIGS and not re.fullmatch(r"lora-k[1-9][0-9]*", c)]
    for flag in ("seq", "micro_batch", "steps", "threads"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.torchrun == 1 or args.torchrun < 0:
        problems.append("--torchrun needs at least 2 processes (0: off)")
    if args.timeout is not None and args.timeout <= 0:
        problems.append("--timeout must be positive")
    for flag in ("warmup", "retries", "wait_quiet"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must be 0 or more")
    try:
        args.peak_sizes = [int(s) for s in args.peak_sizes.split(",")]
    except ValueError:
        problems.append(f"--peak-sizes: expected comma-separated integers, got {args.peak_sizes!r}")
    if not args.dtypes or not args.only:
        problems.append("--dtypes and --only need at least one entry each")
    if problems:
        p.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------- running jobs
def run_worker(job: dict, isolate: bool, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run one job in a fresh process (or here); a failure comes back as ``status: error``.

    A worker still running after `timeout` seconds is stopped and comes back as ``status: timeout``;
    `env` replaces this process's environment for the worker.
    """
    if not isolate:
        from bench import workload

        return workload.run_guarded(job)
    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        done = run_limited([sys.executable, "-m", "bench.workload", str(job_path), str(out_path)], timeout,
                           env=env, cwd=ROOT)
        if done.timed_out:
            return {**_job_keys(job), "status": "timeout",
                    "reason": f"still running at its limit of {timeout:g} s; stopped"}
        if done.returncode != 0 or not out_path.exists():
            tail = done.output.strip().splitlines()[-5:]
            reason = f"worker exited with status {done.returncode}: " + " | ".join(tail)
            return {**_job_keys(job), "status": "error", "reason": reason}
        return json.loads(out_path.read_text())


def run_torchrun(job: dict, nproc: int, timeout: float | None = None, wait_quiet: float = 0.0) -> dict:
    """Run one job under ``torchrun --nproc_per_node nproc`` (`bench/dist_workload.py`), after
    waiting up to `wait_quiet` s for a quiet machine; a failure comes back as ``status: error``
    (or ``timeout``) with the end of its output. ``other_cpu_share``: what other processes took
    of the CPUs during the whole job (its start-up included)."""
    import socket

    waited = wait_for_quiet(wait_quiet, QUIET) if wait_quiet > 0 else 0.0
    with socket.socket() as s:  # a free rendezvous port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cpu_before, started = cpu_seconds(children=True), time.perf_counter()
        done = run_limited([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_port", str(port), "-m", "bench.dist_workload", str(job_path), str(out_path)],
                           timeout, env=env, cwd=ROOT)
        other = other_cpu_share(cpu_before, cpu_seconds(children=True), time.perf_counter() - started)
        keys = {**_job_keys(job), "processes": nproc, "waited_s": waited, "other_cpu_share": other}
        if done.timed_out:
            return {**keys, "status": "timeout", "reason": f"still running at its limit of {timeout:g} s; stopped"}
        if done.returncode != 0 or not out_path.exists():
            tail = done.output.strip().splitlines()[-5:]
            return {**keys, "status": "error", "reason": f"torchrun exited with status {done.returncode}: "
                    + " | ".join(tail)}
        return {**json.loads(out_path.read_text()), **keys}


def measure(job: dict, isolate: bool, wait_quiet: float, retries: int, timeout: float | None = None) -> dict:
    """`run_worker`, after waiting for a quiet machine and retrying while it was not; the quietest run counts."""
    best = None
    for attempt in range(1, retries + 2):
        waited = wait_for_quiet(wait_quiet, QUIET) if wait_quiet > 0 else 0.0
        r = {**run_worker(job, isolate, timeout), "attempt": attempt, "waited_s": waited}
        if best is None or _noise(r) < _noise(best):
            best = r
        if r.get("status") != "ok" or _noise(r) <= QUIET:
            break
    return best


def _noise(r: dict) -> float:
    """Other processes' CPU share during a result's timed steps (unknown counts as quiet)."""
    share = r.get("other_cpu_share")
    return 0.0 if share is None else share


def _job_keys(job: dict) -> dict:
    return {k: job[k] for k in ("config", "shape", "dtype") if k in job}


def machine_info(device: str, threads: int) -> dict:
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in cpu:
                    cpu[key] = value.strip()
    except OSError:
        pass
    flags = set(cpu.pop("flags", "").split())
    versions = {}
    for package in ("torch", "transformers", "peft", "triton", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "git": _git_state(),
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": device,
        "python": platform.python_version(),
        **versions,
    }


# ----------------------------------------------------------------------------- report
def _find(results, config, dtype):
    for r in results:
        if r.get("config") == config and r.get("dtype") == dtype and r.get("status") == "ok":
            return r
    return None


def add_derived(results: list[dict], peaks: dict) -> None:
    """MFU against the measured matmul peak, and ratios against peft / K=1 of the same dtype."""
    for r in results:
        if r.get("status") != "ok":
            continue
        peak = peaks.get(r["dtype"])
        r["mfu"] = r["achieved_gflops"] / peak if peak else None
        peft = _find(results, "peft", r["dtype"])
        r["tokens_vs_peft"] = r["tokens_per_s"] / peft["tokens_per_s"] if peft else None


def _ratio(a, b, key):
    return a[key] / b[key] if a and b else None


def evaluate_targets(results: list[dict], dtypes: list[str]) -> list[dict]:
    """The issue's targets, each PASS / FAIL on the measured figures (n/a when not measured)."""
    rows = []

    def add(name, dtype, value, goal, at_least):
        status = "n/a" if value is None else ("PASS" if (value >= goal if at_least else value <= goal) else "FAIL")
        rows.append({"target": name, "dtype": dtype, "value": value,
                     "goal": f"{'>=' if at_least else '<='} {goal}", "status": status})

    for d in dtypes:
        lora, mix = _find(results, "lora", d), _find(results, "mixlora", d)
        add("our LoRA tokens/s / peft tokens/s", d, _ratio(lora, _find(results, "peft", d), "tokens_per_s"), 1.0, True)
        add("MixLoRA step time / LoRA step time", d, _ratio(mix, lora, "step_time_s"), 1.2, False)
        add("MixLoRA peak memory / LoRA peak memory", d, _ratio(mix, lora, "peak_mem_mb"), 1.15, False)
        add("K=4 tokens/s / K=1 tokens/s (same total batch)", d,
            _ratio(_find(results, "lora-k4", d), lora, "tokens_per_s"), 0.95, True)
        add("LoRA MFU (vs measured matmul peak)", d, lora.get("mfu") if lora else None, 0.60, True)
    if "fp32" in dtypes and "bf16" in dtypes:
        add("bf16 LoRA tokens/s / fp32 LoRA tokens/s", "both",
            _ratio(_find(results, "lora", "bf16"), _find(results, "lora", "fp32"), "tokens_per_s"), 1.5, True)
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = [(f"shape={s['shape']} seq={s['seq']} micro-batch={s['micro_batch']} steps={s['steps']} "
              f"warmup={s['warmup']} device={s['device']} threads={s['threads']} "
              f"grad_ckpt={s['grad_ckpt']} quant={s.get('quant')} lora_dropout={s['lora_dropout']}"),
             (f"code: {m['git']}; machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}, "
              f"transformers {m['transformers']}, peft {m['peft']}; load average before/after: "
              f"{report['load_before']} / {report['load_after']}"),
             "matmul peak: " + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in report["matmul_peak_gflops"].items())
             + _other_note(report.get("matmul_peak_other_cpu_share"))]
    tuned = {bool(r.get("malloc_tuned")) for r in report["results"] if r.get("status") == "ok"}
    if len(tuned) > 1:
        lines.append("allocator: MIXED: some configurations kept freed memory, some did not")
    elif tuned:
        lines.append("allocator: " + ("freed memory kept in the process (mlora.runtime), every configuration" if True in tuned
                                      else "system default (MLORA_SYSTEM_MALLOC or malloc settings in the environment)"))
    other = report.get("other_cpu_share")
    if other is not None:
        lines.append(f"other processes used {100 * other:.0f}% of the CPUs during the whole run "
                     "(per configuration's timed steps: column 'other CPU')")
    noisy = [r["config"] + "/" + r["dtype"] for r in report["results"] if _noise(r) > 2 * QUIET]
    if noisy and s["device"] == "cpu":
        lines.append(f"WARNING: other processes took over {200 * QUIET:.0f}% of the CPUs while timing "
                     f"{', '.join(noisy)}: those timings are unreliable (try --wait-quiet 600 --retries 2)")
    lines.append("")
    header = ("config", "dtype", "K", "rows/K", "step s", "tokens/s", "vs peft", "peak MB", "MB before",
              "GFLOP/s", "MFU", "other CPU")
    table = [header]
    for r in report["results"]:
        if r.get("status") != "ok":
            table.append((r.get("config", "?"), r.get("dtype", "?"), "", "", r.get("status", "?").upper(),
                          r.get("reason", "")[:80], "", "", "", "", "", ""))
            continue
        table.append((r["config"], r["dtype"], str(r["adapters"]), str(r["rows_per_adapter"]),
                      _fmt(r["step_time_s"], ".3f"), _fmt(r["tokens_per_s"], ".0f"),
                      _fmt(r["tokens_vs_peft"], ".2f"), _fmt(r["peak_mem_mb"], ".0f"),
                      _fmt(r["mem_before_steps_mb"], ".0f"), _fmt(r["achieved_gflops"], ".1f"),
                      "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                      "-" if r.get("other_cpu_share") is None else f"{100 * r['other_cpu_share']:.0f}%"))
    lines += _columns(table)
    if report.get("distributed"):
        lines += ["", f"data parallel under torchrun, {s['torchrun']} processes x 1 thread (CPU) against 1 process x "
                      f"{s['threads']} threads, the same global micro-batch of {s['micro_batch']} rows:"]
        table = [("config", "dtype", "procs", "rows/proc", "step s", "tokens/s", "vs 1 process", "all-reduce share",
                  "other CPU")]
        for r in report["distributed"]:
            if r.get("status") != "ok":
                table.append((r.get("config", "?"), r.get("dtype", "?"), str(r.get("processes", "")), "",
                              r.get("status", "?").upper(), r.get("reason", "")[:60], "", "", ""))
                continue
            one = _find(report["results"], r["config"], r["dtype"])
            table.append((r["config"], r["dtype"], str(r["processes"]), str(r["rows_per_process"]),
                          _fmt(r["step_time_s"], ".3f"), _fmt(r["tokens_per_s"], ".0f"),
                          _fmt(_ratio(r, one, "tokens_per_s"), ".2f"), f"{100 * r['allreduce_share']:.1f}%",
                          "-" if r.get("other_cpu_share") is None else f"{100 * r['other_cpu_share']:.0f}%"))
        lines += _columns(table)
    lines += ["", f"targets ({TARGET_NOTE}):"]
    targets = [("target", "dtype", "measured", "goal", "status")]
    targets += [(t["target"], t["dtype"], _fmt(t["value"], ".3f"), t["goal"], t["status"]) for t in report["targets"]]
    lines += _columns(targets)
    return "\n".join(lines)


def _other_note(share) -> str:
    return "" if share is None else f" (other processes: {100 * share:.0f}% of the CPUs)"


def _columns(rows) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate = not args.no_isolate
    profile_dir = str(Path(args.profile).resolve()) if args.profile else None
    common = dict(shape=args.shape, seq=args.seq, micro_batch=args.micro_batch, steps=args.steps,
                  warmup=args.warmup, device=args.device, threads=args.threads, grad_ckpt=args.grad_ckpt,
                  quant=args.quant, lora_dropout=args.lora_dropout, seed=args.seed, profile_dir=profile_dir)
    machine = machine_info(args.device, args.threads)  # before the jobs: the commit they measure
    load_before = _load()
    cpu_before = cpu_seconds(children=True)
    started = time.perf_counter()

    print(f"measuring the matmul peak ({', '.join(args.dtypes)}) ...", flush=True)
    peak = measure({"kind": "peak", "dtypes": args.dtypes, "sizes": args.peak_sizes,
                    "device": args.device, "threads": args.threads}, isolate, args.wait_quiet, args.retries,
                   args.timeout)
    peaks = {p["dtype"]: p["gflops"] for p in peak.get("peaks", [])}
    if not peaks:
        print(f"matmul peak failed: {peak.get('reason')}", file=sys.stderr)

    jobs = [dict(common, kind="train", config=c, dtype=d) for d in args.dtypes for c in args.only]
    results = []
    for i, job in enumerate(jobs, 1):
        r = measure(job, isolate, args.wait_quiet, args.retries, args.timeout)
        results.append(r)
        summary = (f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_time_s']:.3f} s, peak {r['peak_mem_mb']:.0f} MB"
                   if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}")
        print(f"[{i}/{len(jobs)}] {job['dtype']} {job['config']}: {summary}", flush=True)

    distributed = []
    if args.torchrun:
        ours = [c for c in args.only if c == "mixlora" or c == "lora" or c.startswith("lora-k")]
        threads = 1 if args.device == "cpu" else args.threads
        for d in args.dtypes:
            for c in ours:
                job = dict(common, kind="train", config=c, dtype=d, threads=threads, profile_dir=None)
                r = run_torchrun(job, args.torchrun, args.timeout, args.wait_quiet)
                distributed.append(r)
                summary = (f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_time_s']:.3f} s, all-reduce "
                           f"{100 * r['allreduce_share']:.1f}% of it" if r.get("status") == "ok"
                           else f"{r.get('status')}: {r.get('reason')}")
                print(f"[torchrun x{args.torchrun}] {d} {c}: {summary}", flush=True)

    add_derived(results, peaks)
    report = {
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "no_isolate")},
        "isolated_processes": isolate,
        "machine": machine,
        "load_before": load_before,
        "load_after": _load(),
        "wall_s": round(time.perf_counter() - started, 1),
        "other_cpu_share": other_cpu_share(cpu_before, cpu_seconds(children=True),
                                                time.perf_counter() - started),
        "matmul_peak_gflops": peaks,
        "matmul_peak_detail": peak.get("peaks", []),
        "matmul_peak_other_cpu_share": peak.get("other_cpu_share"),
        "results": results,
        "distributed": distributed,
        "targets": evaluate_targets(results, args.dtypes),
        "target_note": TARGET_NOTE,
    }
    print()
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    if args.profile:
        print(f"profiles: {profile_dir}")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in results + distributed) and peaks else 1


def _git_state() -> str | None:
    """The checkout measured: commit, plus "+local changes" when the engine differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mlora", "bench"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + (" +local changes" if dirty else "")) if commit else None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
