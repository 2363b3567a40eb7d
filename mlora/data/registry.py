"""Name -> `Task` for the benchmarks, and parsing of an adapter's `task_name`."""

from __future__ import annotations

import difflib

from mlora.config import CASUAL_TASK, split_list
from mlora.data import arc, boolq, hellaswag, obqa, piqa, siqa, winogrande
from mlora.data.errors import DataError
from mlora.data.task import Task

_TASKS: dict[str, Task] = {
    task.name: task
    for module in (arc, boolq, obqa, piqa, siqa, hellaswag, winogrande)
    for task in module.TASKS
}

# The commonsense benchmarks every adapter can be trained and scored on (DESIGN.md section 6):
# the registry's tasks, in its order.
BENCHMARK_TASKS: tuple[str, ...] = tuple(_TASKS)


def _unknown(name: str) -> DataError:
    known = [*_TASKS, CASUAL_TASK]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return DataError(f"Unknown task {name!r}.{hint} Known tasks: {', '.join(known)}.")


def is_benchmark(name: str) -> bool:
    """True for the multiple-choice benchmarks ("arc-c", ...); False for "casual" and others."""
    return name in _TASKS


def get_task(name: str) -> Task:
    """The benchmark `Task` called `name`; raises `DataError` (with a suggestion) otherwise."""
    if name in _TASKS:
        return _TASKS[name]
    if name == CASUAL_TASK:
        raise DataError(
            "'casual' is instruction data, not a benchmark task: it has no fixed source or "
            "labels. Build its examples with build_training_examples('casual', data=..., prompt=...)."
        )
    raise _unknown(name)


def task_names(task_name: str) -> tuple[str, ...]:
    """Split an adapter's `task_name` ("arc-c", "arc-c;boolq", "casual") into task names.

    Each entry must be a benchmark or "casual"; an entry may repeat (the config allows the
    same task twice with different data). Raises `DataError` naming the bad entry.
    """
    names = tuple(split_list(task_name))
    if any(not name for name in names):
        raise DataError(f"task_name {task_name!r} has an empty entry; write tasks as 'a;b;c'.")
    for name in names:
        if name != CASUAL_TASK and name not in _TASKS:
            raise _unknown(name)
    return names
