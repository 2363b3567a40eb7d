"""Evaluation throughput: multiple-choice items scored under the `loglikelihood` protocol.

    python bench/eval_throughput.py                      # SmolLM2-135M, 400 ARC-style items x 4 choices, fp32
    python bench/eval_throughput.py --items 100 --scorers shared,plain --json eval.json

Scorers (`--scorers`), all on the same model, tokenizer and requests:
  shared   mlora's `evaluate`: the choices of an item share one row (their common prefix
           once), the LM head runs at the read positions only.
  plain    `evaluate(share_context=False)`: one row per choice and logits at every position,
           right padding; the layout mlora used before shared contexts.
  lm-eval  lm-evaluation-harness's HF backend (`HFLM.loglikelihood`) wrapping the same
           in-memory model, fed the items' `loglikelihood` requests.

Items are generated ARC-style questions (no hub), written as an ARC-Easy file and read
through the task registry. Each scorer runs in a fresh process: it loads the model, scores a
few items to warm up, then times one pass over all items (`--no-isolate`: all in this process,
for the smoke test); peak memory is the process's
resident set at its highest during that pass (the high-water mark is reset after loading
and warm-up). Every process keeps freed memory the way the CLI does (`mlora.runtime`). The
report gives items/s, the speed-ups, the CPU seconds the pass used (all threads; less
sensitive than wall time to other processes), peak RSS, and the largest difference of any
choice's log-likelihood from the `plain` scores. On a shared machine, `--repeats N` runs the scorers N
times in turn and keeps each one's fastest pass, and `--wait-quiet SECONDS` waits (at most that
long) for other processes to go quiet before every pass; "other CPU" is the share of the CPUs
other processes took during the kept pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/eval_throughput.py`
    sys.path.insert(0, str(ROOT))

from bench.interference import cpu_seconds, other_cpu_share, wait_for_quiet

SCORERS = ("shared", "plain", "lm-eval")
WORDS = (
    "water", "air", "heat", "light", "plant", "animal", "rock", "soil", "river", "cloud", "rain", "wind",
    "sun", "moon", "star", "earth", "energy", "force", "motion", "speed", "mass", "weight", "sound", "wave",
    "metal", "wood", "glass", "paper", "salt", "sugar", "iron", "copper", "magnet", "wire", "battery",
    "circuit", "lamp", "seed", "root", "leaf", "stem", "flower", "fruit", "insect", "bird", "fish", "frog",
    "cell", "body", "heart", "lung", "blood", "bone", "muscle", "skin", "teacher", "student", "class", "test",
    "result", "data", "table", "graph", "chart", "scale", "ruler", "thermometer", "microscope", "telescope",
    "season", "winter", "summer", "spring", "autumn", "day", "night", "shadow", "mirror", "lens", "ice",
    "steam", "gas", "liquid", "solid", "melt", "freeze", "boil", "grow", "change", "cause", "effect", "model",
    "system", "cycle", "food", "chain", "habitat", "forest", "desert", "ocean", "lake", "mountain", "valley",
    "volcano", "earthquake", "fossil", "layer", "erosion", "weather", "climate",
)
STEMS = ("Which of these best explains why", "What happens when", "A student observes that",
         "Which statement describes how", "Scientists noticed that", "What is the most likely reason that")


# --------------------------------------------------------------------------------- items
def write_items(folder: Path, n: int, choices: int, seed: int) -> Path:
    """`n` ARC-style rows (question of 12-30 words, `choices` options of 1-5 words) as an
    ARC-Easy test split in `folder`; returns the folder."""
    rng = random.Random(seed)
    labels = [chr(65 + k) for k in range(choices)]
    rows = []
    for i in range(n):
        question = f"{rng.choice(STEMS)} the {' '.join(rng.choices(WORDS, k=rng.randint(10, 28)))}?"
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) for _ in labels]
        rows.append({"id": f"bench-{i}", "question": question, "choices": {"text": texts, "label": labels},
                     "answerKey": rng.choice(labels)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ------------------------------------------------------------------------------- memory
def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -------------------------------------------------------------------------------- worker
def load_model(name: str):
    from mlora.model.loading import load_base_model

    if name == "smollm2":
        from mlora.model.gguf import fetch_smollm2

        name = str(fetch_smollm2())
    return load_base_model(name, dtype="fp32", device="cpu")


def score(scorer: str, model, tokenizer, folder: Path, batch_size: int, limit: int | None) -> list[list[float]]:
    """Every item's per-choice log-likelihoods (lm-eval's choice order) with `scorer`."""
    from mlora.data import load_items

    if scorer == "lm-eval":
        from lm_eval.api.instance import Instance

        items = load_items("arc-e", "eval", folder, limit=limit)
        requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=k)
                    for item in items for k, pair in enumerate(item.loglikelihood.pairs())]
        lls = [ll for ll, _ in model.loglikelihood(requests, disable_tqdm=True)]
        out, start = [], 0
        for item in items:
            n = len(item.loglikelihood.continuations)
            out.append(lls[start:start + n])
            start += n
        return out
    from mlora.evaluate import BASE, EvalSpec, evaluate
    from mlora.evaluate.batched import EvalTask

    spec = EvalSpec(BASE, None, (EvalTask("arc-e", str(folder), "loglikelihood"),), batch_size)
    shared = scorer == "shared"
    results = evaluate(model, tokenizer, [spec], limit=limit, share_context=shared,
                       padding_side="left" if shared else "right")
    return results.tasks[0].scores


def worker(args) -> dict:
    import torch

    from mlora.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _timed_pass(args)
    finally:
        torch.set_num_threads(threads)


def _timed_pass(args) -> dict:
    import torch

    hf, tokenizer = load_model(args.model)
    if args.worker == "lm-eval":
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    else:
        from mlora.model.adapted import MultiAdapterModel

        model = MultiAdapterModel(hf)
    folder = write_items(Path(args.data), args.items, args.choices, args.seed)
    with torch.no_grad():
        score(args.worker, model, tokenizer, folder, args.batch_size, args.warmup)
        loaded = _status_mb("VmRSS")
        exact_peak = _reset_peak()
        before, start, own = cpu_seconds(), time.perf_counter(), time.process_time()
        scores = score(args.worker, model, tokenizer, folder, args.batch_size, None)
        seconds, cpu = time.perf_counter() - start, time.process_time() - own
        other = other_cpu_share(before, cpu_seconds(), seconds)
    peak = _status_mb("VmHWM") if exact_peak else None
    return {"scorer": args.worker, "seconds": seconds, "items_per_s": args.items / seconds, "cpu_seconds": cpu,
            "rss_before_mb": loaded, "peak_rss_mb": peak, "other_cpu_share": other, "scores": scores}


# -------------------------------------------------------------------------------- parent
def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def run(args, scorer: str, data: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", scorer, "--data", data,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("model", "items", "choices", "batch_size", "threads", "warmup", "seed")]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"scorer": scorer, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(results: list[dict]) -> str:
    by = {r["scorer"]: r for r in results if "error" not in r}
    reference = by.get("plain", {}).get("scores")
    header = (f"{'scorer':8}  {'seconds':>8}  {'items/s':>8}  {'vs plain':>8}  {'vs lm-eval':>10}  {'CPU s':>7}  "
              f"{'peak RSS MB':>11}  {'max |dLL|':>9}  {'other CPU':>9}")
    lines = [header]
    for r in results:
        if "error" in r:
            lines.append(f"{r['scorer']:8}  failed: {r['error']}")
            continue
        ratio = {k: r["items_per_s"] / by[k]["items_per_s"] if k in by else None for k in ("plain", "lm-eval")}
        diff = None
        if reference is not None:
            diff = max(abs(a - b) for got, want in zip(r["scores"], reference) for a, b in zip(got, want))
        lines.append(f"{r['scorer']:8}  {r['seconds']:8.2f}  {r['items_per_s']:8.2f}  {_fmt(ratio['plain'], '8.2f')}  "
                     f"{_fmt(ratio['lm-eval'], '10.2f')}  {r['cpu_seconds']:7.0f}  {_fmt(r['peak_rss_mb'], '11.0f')}  "
                     f"{_fmt(diff, '9.2e')}  "
                     f"{_fmt(r['other_cpu_share'], '9.2f')}")
        r["max_abs_dll_vs_plain"] = diff
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the GGUF of the quickstart) or a model folder.")
    p.add_argument("--items", type=int, default=400, help="Generated ARC-style items.")
    p.add_argument("--choices", type=int, default=4, help="Choices per item.")
    p.add_argument("--scorers", default=",".join(SCORERS), help=f"Comma-separated: {', '.join(SCORERS)}.")
    p.add_argument("--batch-size", type=int, default=16, help="Rows (lm-eval: requests) per forward.")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads.")
    p.add_argument("--warmup", type=int, default=8, help="Items scored before timing.")
    p.add_argument("--seed", type=int, default=0, help="Item generation seed.")
    p.add_argument("--repeats", type=int, default=1, help="Passes per scorer, in turn; the fastest counts.")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="Before each pass, wait up to this many seconds for a quiet machine.")
    p.add_argument("--no-isolate", action="store_true",
                   help="Run the scorers in this process (quicker; peak memory figures then share it).")
    p.add_argument("--json", help="Write the results (with every score) here.")
    p.add_argument("--worker", choices=SCORERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.scorers.split(",")) - set(SCORERS)
    if unknown:
        p.error(f"unknown scorer(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCORERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    scorers = args.scorers.split(",")
    runs: dict[str, list[dict]] = {scorer: [] for scorer in scorers}
    with tempfile.TemporaryDirectory() as data:
        for _ in range(args.repeats):
            for scorer in scorers:
                if args.wait_quiet:
                    wait_for_quiet(args.wait_quiet)
                if args.no_isolate:
                    runs[scorer].append(worker(argparse.Namespace(**{**vars(args), "worker": scorer, "data": data})))
                else:
                    runs[scorer].append(run(args, scorer, data))
    # Each scorer's fastest pass (other processes only ever slow a pass down); failures show.
    results = [max(r, key=lambda x: x.get("items_per_s", -1.0)) for r in runs.values()]
    print(f"{args.items} items x {args.choices} choices, model {args.model}, fp32, batch {args.batch_size}, "
          f"{args.threads} threads")
    print(report(results))
    if args.json:
        doc = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "data", "json")},
               "machine": machine(), "results": results,
               "all_passes": {k: [{f: v for f, v in r.items() if f != "scores"} for r in rs] for k, rs in runs.items()}}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
