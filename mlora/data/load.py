"""The two entry points the trainer and the evaluator use: items of a split, training examples."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from mlora.config import CASUAL_TASK, split_list
from mlora.data.casual import instruction_examples, load_template
from mlora.data.errors import DataError
from mlora.data.items import PROTOCOLS, MultipleChoiceItem, Protocol, TrainingExample
from mlora.data.registry import get_task, task_names
from mlora.data.sources import parse_rows, read_split

DataSpec = str | os.PathLike | None


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}.")


def load_items(
    task_name: str,
    split: str,
    data: DataSpec = None,
    trust_remote_code: bool = False,
    limit: int | None = None,
) -> list[MultipleChoiceItem]:
    """The items of one split of one benchmark task, in source order.

    Args:
        task_name: one benchmark name ("arc-c", ..., see `BENCHMARK_TASKS`).
        split: "train", "eval" (the task's evaluation split: "test" for ARC and OBQA,
            "validation" for the others) or a literal split name.
        data: None (the task's hub dataset), a local file or folder, or a hub id
            ("owner/name" or "owner/name:subset"); see `mlora.data.sources`.
        trust_remote_code: forwarded to `datasets.load_dataset` only when True.
        limit: keep the first `limit` rows only (None: all).

    Returns:
        One `MultipleChoiceItem` per row.

    Raises:
        DataError: unknown task, missing or unreadable data, or malformed rows (all of them
            listed with file and row number).
    """
    _check_limit(limit)
    task = get_task(task_name)
    split_name = task.split_name(split)
    chunks = read_split(
        data, split_name, name=task.name, hub_id=task.hub_id, subset=task.subset, trust_remote_code=trust_remote_code
    )
    return parse_rows(task.name, chunks, task.item, limit)


def task_sources(names: Sequence[str], data: DataSpec | Sequence[DataSpec]) -> list[tuple[str, DataSpec]]:
    """Pair each task of an adapter with the `data` it reads.

    `data` may be None (every task's default source), one source per task (a sequence, or a
    string joined by ';' as in the config, an empty entry meaning the default), or, for
    several tasks, one folder holding a subfolder per task (`<folder>/<task>/`).
    """
    if data is None:
        return [(name, None) for name in names]
    if isinstance(data, (list, tuple)):
        sources = list(data)
    elif len(names) == 1:
        return [(names[0], data)]
    elif ";" in os.fspath(data):
        sources = [entry or None for entry in split_list(os.fspath(data))]
    else:
        folder = Path(os.fspath(data)).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"A multi-task adapter ({';'.join(names)}) cannot read all its tasks from {os.fspath(data)!r}: "
                "give one source per task joined by ';' (an empty entry uses that task's hub dataset), or a "
                "folder with one subfolder per task (path/to/folder/arc-c/train.jsonl, ...)."
            )
        missing = [name for name in names if not (folder / name).is_dir()]
        if missing:
            raise DataError(f"{folder}: missing the subfolder(s) {', '.join(missing)} for this multi-task adapter.")
        return [(name, folder / name) for name in names]
    if len(sources) != len(names):
        raise DataError(
            f"data gives {len(sources)} source(s) for {len(names)} task(s) ({';'.join(names)}); give one per task."
        )
    return list(zip(names, sources))


def build_training_examples(
    task_name: str,
    data: DataSpec | Sequence[DataSpec] = None,
    protocol: Protocol = "choice",
    prompt: str | None = None,
    *,
    trust_remote_code: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> list[TrainingExample]:
    """The training examples of one adapter.

    Args:
        task_name: the adapter's `task_name`: a benchmark, "casual", or several joined by ';'.
        data: the adapter's `data`: None, one source (see `load_items`), or for several
            tasks one source per task (';'-joined or a sequence; an empty entry is the
            default) or one folder with a subfolder per task. "casual" needs a source.
        protocol: "choice" (target " {letter}") or "loglikelihood" (target " {answer text}");
            benchmark tasks only.
        prompt: template for "casual": "alpaca" (default) or a template file path. Benchmark
            tasks have their own prompt layout and ignore it (configs set it for every
            adapter, "alpaca" by default).
        trust_remote_code: forwarded to `datasets.load_dataset` only when True.
        limit: at most this many rows per task.
        seed: shuffles a multi-task mixture so that any prefix samples all tasks; a single
            task keeps source order (the trainer shuffles per epoch).

    Returns:
        `TrainingExample`s, each with its own task name (so a mixture can be scored per task).

    Raises:
        DataError: as `load_items`, plus a bad task name, protocol, template or data layout.
    """
    _check_limit(limit)
    names = task_names(task_name)
    if protocol not in PROTOCOLS and any(name != CASUAL_TASK for name in names):
        raise DataError(f"Unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}.")
    examples: list[TrainingExample] = []
    for name, source in task_sources(names, data):
        if name == CASUAL_TASK:
            examples.extend(_instruction_examples(source, prompt, trust_remote_code, limit))
        else:
            items = load_items(name, "train", source, trust_remote_code=trust_remote_code, limit=limit)
            examples.extend(item.training_example(protocol) for item in items)
    if len(names) > 1:
        random.Random(seed).shuffle(examples)
    return examples


def _instruction_examples(
    data: DataSpec, prompt: str | None, trust_remote_code: bool, limit: int | None
) -> list[TrainingExample]:
    if data is None:
        raise DataError(
            "task 'casual' needs data: a hub id or a local alpaca-style file "
            "(records with instruction, input, output) given as the adapter's \"data\"."
        )
    template = load_template(prompt)
    chunks = read_split(data, "train", name=CASUAL_TASK, hub_id=None, trust_remote_code=trust_remote_code)
    return instruction_examples(chunks, template, limit)
