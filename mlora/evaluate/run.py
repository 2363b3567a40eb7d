"""Run level: which saved adapters to score, loading them, printing and saving the table.

`evaluate_run` is what `launch.py evaluate` (through `evaluate_saved`) and the end of
`launch.py run` (through `evaluate_trained`) call.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Sequence
from pathlib import Path

from mlora.config import LoraConfig, RunConfig
from mlora.data import BENCHMARK_TASKS
from mlora.evaluate.batched import BASE, Shard, adapter_spec, base_spec, evaluate
from mlora.evaluate.protocols import EvaluationError
from mlora.evaluate.replicas import group_replicas
from mlora.evaluate.results import RESULTS_STEM, EvalResults, format_table, save_results
from mlora.run_folder import RunFolder, open_run_folder


def _has_benchmark(cfg: LoraConfig) -> bool:
    return any(task in BENCHMARK_TASKS for task in cfg.tasks)


def plan_evaluation(run_config: RunConfig, output_dir, adapters: Sequence[str] | None = None,
                    require_tasks: bool = True) -> tuple[list, list | None]:
    """Which saved adapters of a run to score, checked before any model is loaded.

    Args:
        run_config: the `RunConfig`.
        output_dir: where the adapters were saved (``output_dir/<name>/``).
        adapters: names to score (``base`` = the bare base model on the tasks of every
            adapter of the config); None: every adapter with a benchmark task.
        require_tasks: a named adapter without a benchmark task is an error (True) or skipped.
    Returns:
        ``(adapter configs to load and score, configs whose tasks the base is scored on, or
        None when the base is not scored)``.
    Raises:
        EvaluationError: unknown name, no benchmark task, or a missing adapter folder (all
            missing folders are named together).
    """
    by_name = {cfg.name: cfg for cfg in run_config.lora}
    with_tasks = [cfg for cfg in run_config.lora if _has_benchmark(cfg)]
    names = list(adapters) if adapters is not None else [cfg.name for cfg in with_tasks]
    unknown = [n for n in names if n != BASE and n not in by_name]
    if unknown:
        close = {n: difflib.get_close_matches(n, list(by_name), 1) for n in unknown}
        hints = [f"{n!r}" + (f" (did you mean {m[0]}?)" if m else "") for n, m in close.items()]
        raise EvaluationError(f"unknown adapter {', '.join(hints)}; the config has {', '.join(by_name)} "
                              f"(or '{BASE}' for the bare base model)")
    if not with_tasks and (BASE in names or (adapters is None and require_tasks)):
        raise EvaluationError("no adapter in the config has a benchmark task "
                              f"({', '.join(f'{c.name}: {c.task_name}' for c in run_config.lora)}); "
                              f"evaluation scores {', '.join(BENCHMARK_TASKS)}")
    chosen = [by_name[n] for n in dict.fromkeys(names) if n != BASE]
    no_tasks = [cfg for cfg in chosen if not _has_benchmark(cfg)]
    if no_tasks and require_tasks:
        raise EvaluationError(f"adapter {', '.join(f'{c.name} ({c.task_name})' for c in no_tasks)} has no "
                              f"benchmark task to score; benchmarks are {', '.join(BENCHMARK_TASKS)}")
    chosen = [cfg for cfg in chosen if _has_benchmark(cfg)]
    folder = Path(output_dir)
    missing = [folder / cfg.name for cfg in chosen if not (folder / cfg.name / "adapter_config.json").is_file()]
    if missing:
        raise EvaluationError(f"no saved adapter in {', '.join(map(str, missing))} (adapter_config.json not found); "
                              "train it first with `python launch.py run`, or pass the --output_dir it was saved in")
    return chosen, (with_tasks if BASE in names else None)


def evaluate_run(model, tokenizer, run_config: RunConfig, output_dir, base_model_name: str | None = None, *,
                 adapters: Sequence[str] | None = None, protocol: str | None = None, limit: int | None = None,
                 require_tasks: bool = True, stem: str | None = None, progress: bool = True,
                 echo=print, folder: RunFolder | None = None, shard: Shard | None = None,
                 charts: bool = False) -> EvalResults | None:
    """Score the saved adapters of a run, print the table and save it into ``output_dir/_mlora/``.

    This is what `launch.py run` calls after training and what `launch.py evaluate` runs.
    Adapters are loaded from ``output_dir/<name>/`` onto `model` (one already loaded under its
    name is used as it is), scored in shared batches of ``eval_lora_simultaneously_num``
    adapters, and removed again, so the model is left as it was found.

    Args:
        model: a `MultiAdapterModel` over the base model.
        tokenizer: the base model's tokenizer.
        run_config: the `RunConfig` the adapters were trained from.
        output_dir: the run's output folder (adapters in, results out).
        base_model_name: recorded in the results.
        adapters, require_tasks: see `plan_evaluation` (``base`` scores the bare model).
        protocol: override every adapter's own protocol.
        limit: at most this many items per task.
        stem: results file name stem (``<stem>.json`` and ``<stem>.csv``); None: `results_stem`
            of `adapters`, `protocol` and `limit`, so a partial evaluation never replaces a full one.
        progress: show a progress bar.
        echo: where the table and file names are printed.
        folder: `output_dir` opened by the caller (`open_run_folder`); None opens it to save.
        shard: this rank's part of the scoring over several processes (`Shard`); every rank
            gets every score, rank 0 alone prints and saves.
        charts: also draw the accuracy chart (``<stem>.png``) next to the results and, for the
            full results (``eval_results``), the scored adapters' loss curves (`mlora.plot`;
            without matplotlib, one line says how to get them).
    Returns:
        The `EvalResults`, or None when there was nothing to score (``require_tasks=False``).
    """
    from mlora.io import load_adapter

    chosen, base_from = plan_evaluation(run_config, output_dir, adapters, require_tasks)
    if not chosen and base_from is None:
        echo("evaluation: no adapter with a benchmark task to score")
        return None
    loaded = []
    try:
        for cfg in chosen:
            if cfg.name not in model.configs:
                load_adapter(model, Path(output_dir) / cfg.name, cfg)
                loaded.append(cfg.name)
        specs = [adapter_spec(cfg, protocol) for cfg in chosen]
        if base_from is not None:
            specs.append(base_spec(base_from, protocol))
        results = evaluate(model, tokenizer, specs, simultaneous=run_config.eval_lora_simultaneously_num,
                           limit=limit, model_name=base_model_name, progress=progress, shard=shard)
    finally:
        for name in loaded:
            model.remove_adapter(name)
    results.configurations = group_replicas(chosen)  # replicas of one configuration: mean ± std
    if stem is None:
        stem = results_stem(adapters[0] if adapters is not None and len(adapters) == 1 else None, protocol, limit)
    if shard is not None and shard.rank != 0:
        return results  # rank 0 writes and prints
    with contextlib.nullcontext(folder) if folder is not None else open_run_folder(output_dir) as opened:
        for suffix in (".json", ".csv"):
            opened.check_replaceable(opened.meta / f"{stem}{suffix}")
        json_path, csv_path = save_results(results, opened.meta, stem)
        for path in (json_path, csv_path):
            opened.created(path)
        echo(format_table(results))
        echo(f"results: {json_path} and {csv_path}")
        if charts:
            from mlora.plot import draw_charts_or_say_why

            # The loss chart shows the whole run: redrawn with the full results only, never
            # narrowed to the adapters of a partial evaluation.
            draw_charts_or_say_why(opened, echo, results=results.to_dict(), stem=stem,
                                   adapters=[cfg.name for cfg in chosen] if stem == RESULTS_STEM else [])
    return results


def results_stem(adapter: str | None = None, protocol: str | None = None, limit: int | None = None) -> str:
    """``eval_results``, ``eval_results_<adapter>``, ``..._<protocol>``, ``..._limit<N>``: a partial,
    re-scored or limited evaluation never replaces the full one."""
    parts = [adapter, protocol, f"limit{limit}" if limit is not None else None]
    return "_".join([RESULTS_STEM] + [part for part in parts if part])


def evaluate_saved(base_model: str, run_config: RunConfig, output_dir, *, adapters: Sequence[str] | None = None,
                   protocol: str | None = None, limit: int | None = None, dtype: str | None = None,
                   quantize: str | None = None, device: str | None = None, stem: str | None = None,
                   progress: bool = True, echo=print, folder: RunFolder | None = None,
                   charts: bool = False) -> EvalResults | None:
    """`launch.py evaluate`: check the plan, load the base model, then `evaluate_run`.

    `dtype` None is bf16 on a CUDA device that supports it, else fp32 (as `launch.py run`).
    Raises EvaluationError, DataError, ModelLoadError, AdapterFileError on bad input.
    """
    from mlora.model.adapted import MultiAdapterModel
    from mlora.model.loading import default_device, default_dtype, load_base_model

    plan_evaluation(run_config, output_dir, adapters)  # fail before the (slow) model load
    device = default_device(device)
    model, tokenizer = load_base_model(base_model, dtype=default_dtype(dtype, device), quantize=quantize,
                                       device=device)
    return evaluate_run(MultiAdapterModel(model), tokenizer, run_config, output_dir, base_model,
                        adapters=adapters, protocol=protocol, limit=limit, stem=stem, progress=progress, echo=echo,
                        folder=folder, charts=charts)


def evaluate_trained(summary, run_config: RunConfig, base_model_name: str | None, echo=print,
                     folder: RunFolder | None = None, shard: Shard | None = None,
                     charts: bool = False) -> EvalResults | None:
    """`launch.py run`, after training: score every adapter that finished (now or in an
    earlier run) and has a benchmark task, on the model and tokenizer training used.

    `summary` is the trainer's `TrainSummary`; `shard` this rank's part over several
    processes. Returns None when nothing was scored.
    """
    done = [a.name for a in summary.adapters.values() if a.status in ("finished", "done-before")]
    if not done or summary.model is None:
        return None
    return evaluate_run(summary.model, summary.tokenizer, run_config, summary.output_dir, base_model_name,
                        adapters=done, require_tasks=False, echo=echo, stem=RESULTS_STEM, folder=folder,
                        shard=shard, charts=charts)
