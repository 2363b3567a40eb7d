"""Run configs from templates: what ``launch.py gen`` writes, as a library function.

    cfg = generate_config("mixlora", ["arc-c", "arc-e", "boolq"], multi_task=True, adapter_name="mixlora")
    cfg = generate_config("lora", ["arc-e"], adapter_overrides={"r": 16}, base=cfg)   # --append
    cfg = generate_config("mixlora", ["arc-e"], adapter_name="mixlora", grid={"r": [8, 16], "lr": [1e-4, 2e-4]},
                          seeds=[0, 1, 2])   # 12 adapters, mixlora_r8_lr1e-4_s0 ... mixlora_r16_lr2e-4_s2

A template is a run config shipped in ``templates/`` (or any run-config file). Each of its
adapters is instantiated for every task (single-task: one adapter per task, named
``{task}_{i}``; multi-task: one adapter for all tasks, scored on each). A task that is not a
benchmark but names a data set becomes instruction tuning (``casual``). A sweep (`grid`,
`seeds`) instantiates each of those adapters once per grid point and seed (`mlora.sweep`),
named after the point. The result is validated as a whole (`mlora.config.config_from_dict`):
an invalid combination raises `ConfigError` listing every problem (an adapter of a sweep named
by its grid point's values), so nothing invalid is ever written.

This module imports only the standard library and `mlora.config`, so generating a config
does not pay for torch.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlora.config import CASUAL_TASK, ConfigError, RunConfig, config_from_dict, load_config, to_dict
from mlora.errors import MloraError
from mlora.sweep import GridPoint, annotate_problems, expand_grid

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class GenError(MloraError):
    """A template or task name that cannot be resolved; the message lists the valid ones."""


def template_names() -> list[str]:
    """Names of the templates shipped in ``templates/`` (file names without ``.json``)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def benchmark_tasks() -> tuple[str, ...]:
    from mlora.data import BENCHMARK_TASKS  # the registry is the one list of benchmarks

    return tuple(BENCHMARK_TASKS)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def read_template(name: str) -> RunConfig:
    """A shipped template by name, or a run-config file given by its path."""
    path = TEMPLATE_DIR / f"{name}.json"
    if not path.is_file():
        if name.endswith(".json") and Path(name).is_file():
            path = Path(name)
        elif not TEMPLATE_DIR.is_dir():
            raise GenError(f"no templates folder at {TEMPLATE_DIR}; install mlora from a checkout with `pip install -e .`")
        else:
            names = template_names()
            raise GenError(f"unknown template {name!r}; {_suggest(name, names)}valid templates: {', '.join(names)} "
                           "(or a path to a run-config .json file)")
    # Validated first, so a broken template is blamed on the template, not on the output.
    return load_config(path)


def adapter_stem(label: str) -> str:
    """A folder-safe adapter name stem: ``arc-c`` -> ``arc_c``, ``yahma/alpaca-cleaned`` -> ``alpaca_cleaned``."""
    stem = re.split(r"[/\\:]", label.rstrip("/\\"))[-1]
    for suffix in DATA_SUFFIXES:
        stem = stem.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9_]", "_", stem).strip("_")
    return stem or CASUAL_TASK


def resolve_task(task: str, data_path: str | None) -> tuple[str, str | None, str]:
    """One task entry -> ``(task_name, data, name stem)``.

    A benchmark keeps its name; anything that names a data set (a hub id ``owner/name``, an
    ``id:subset``, a local file or folder, or a name given a data path) becomes instruction
    data (``casual``) read from that source.
    """
    benchmarks = benchmark_tasks()
    if task in benchmarks:
        return task, data_path, adapter_stem(task)
    if task == CASUAL_TASK:
        if data_path is None:
            raise GenError("task 'casual' needs --data_path (a hub id or a local json/jsonl/parquet file)")
        return CASUAL_TASK, data_path, adapter_stem(data_path)
    if data_path is not None:
        return CASUAL_TASK, data_path, adapter_stem(task)
    if "/" in task or ":" in task or task.endswith(DATA_SUFFIXES) or os.path.exists(task):
        return CASUAL_TASK, task, adapter_stem(task)
    raise GenError(f"unknown task {task!r}; {_suggest(task, benchmarks)}valid tasks: {', '.join(benchmarks)}; "
                   "for instruction data give a hub id (owner/name), a local file, or --data_path")


def generate_config(template: str, tasks: Sequence[str], *, data_paths: Sequence[str | None] | None = None,
                    multi_task: bool = False, adapter_name: str | None = None,
                    adapter_overrides: Mapping[str, object] | None = None,
                    run_overrides: Mapping[str, object] | None = None, base: RunConfig | None = None,
                    grid: Mapping[str, Sequence[object]] | None = None, seeds: Sequence[int] | None = None,
                    source: str = "<gen>") -> RunConfig:
    """The fully resolved run config for `template` instantiated on `tasks`.

    Args:
        template: a template name (`template_names`) or a run-config file path.
        tasks: task names (benchmarks, or data sets for instruction tuning).
        data_paths: a local source per task (None entries keep the benchmark's own source).
        multi_task: one adapter trained on all tasks instead of one per task.
        adapter_name: name stem (adapters are named ``STEM_i``, in a sweep ``STEM_<point>``);
            default the task's name, or ``multi_task``.
        adapter_overrides: adapter keys set on every new adapter (``{"r": 16, "lr": 1e-4}``).
        run_overrides: run-level keys (``cutoff_len``, ``save_step``).
        base: an existing config to append to (its adapters and run settings are kept).
        grid: a sweep: adapter keys and the values each takes (``{"r": [8, 16]}``); every
            combination becomes its own adapter, named ``STEM_r8``, ``STEM_r16``.
        seeds: a sweep's replicas: each point once per seed, its ``seed`` key set and ``_s<seed>``
            ending its name. None (and no grid): adapters named ``STEM_i`` without a seed key.
        source: the file name used in error messages.
    Raises:
        GenError: an unknown template or task, an empty task name, mismatched data paths, a key
            both overridden and swept.
        SweepError: a grid or seed list that cannot be expanded.
        ConfigError: the result is not a valid run config (every problem listed).
    """
    if not tasks or any(not t for t in tasks):
        raise GenError(f"tasks {';'.join(tasks)!r} include an empty task name; separate task names with ';'")
    paths = list(data_paths) if data_paths else [None] * len(tasks)
    if len(paths) != len(tasks):
        raise GenError(f"--data_path gives {len(paths)} path(s) for {len(tasks)} task(s); give one per task, "
                       "joined by ';'")
    resolved = [resolve_task(t, p or None) for t, p in zip(tasks, paths)]
    both = sorted(set(grid or {}) & set(adapter_overrides or {}))
    if both:
        raise GenError(f"{', '.join(both)} given both as a single value and as a sweep; give one list of values")
    sweeping = bool(grid) or seeds is not None
    points = expand_grid(grid, seeds) if sweeping else [GridPoint(())]
    template_dict = to_dict(read_template(template))
    start = to_dict(base) if base is not None else template_dict
    run_level = {k: v for k, v in start.items() if k != "lora"}
    run_level.update(run_overrides or {})
    adapters = list(start["lora"]) if base is not None else []

    groups = [resolved] if multi_task else [[r] for r in resolved]
    swept: dict[int, tuple[str, GridPoint]] = {}  # index in the adapter list -> its stem and grid point
    for template_adapter in template_dict["lora"]:
        for group in groups:
            stem = _stem(adapter_name, multi_task, group[0][2], len(groups), template_adapter["name"],
                         len(template_dict["lora"]), sweeping)
            for point in points:
                a = dict(template_adapter)
                a["task_name"] = ";".join(task for task, _, _ in group)
                sources = [data for _, data, _ in group]
                a["data"] = None if all(s is None for s in sources) else ";".join(s or "" for s in sources)
                if any(task == CASUAL_TASK for task, _, _ in group):
                    a["prompt"] = "alpaca"
                a.update(adapter_overrides or {})
                a.update(point.overrides)
                if sweeping:
                    a["name"] = f"{stem}_{point.suffix}"
                    swept[len(adapters)] = (stem, point)
                else:
                    a["name"] = f"{stem}_{len(adapters)}"
                adapters.append(a)
    try:
        return config_from_dict({**run_level, "lora": adapters}, source=source)
    except ConfigError as err:
        if not swept:
            raise
        raise ConfigError(annotate_problems(err.problems, swept), err.source) from None


def _stem(adapter_name: str | None, multi_task: bool, task_stem: str, num_groups: int, template_adapter: str,
          num_template_adapters: int, sweeping: bool) -> str:
    """The name stem of one group's adapters. Outside a sweep the index ending every name keeps
    them apart; in a sweep the name ends with the grid point, so a shared ``--adapter_name``
    gains the task (several single-task groups) and the template adapter's name (a template
    with several adapters) to keep the names unique."""
    stem = adapter_name or ("multi_task" if multi_task else task_stem)
    if sweeping and adapter_name and num_groups > 1:
        stem = f"{stem}_{task_stem}"
    if sweeping and num_template_adapters > 1:
        stem = f"{stem}_{adapter_stem(template_adapter)}"
    return stem
