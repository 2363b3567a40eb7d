"""The batched pass: many adapters (and the bare base) scored in shared forwards.

Every (adapter, task) turns into rows of token ids (`mlora.evaluate.protocols`). Each adapter's
rows are sorted by length and cut into batches of its ``evaluate_batch_size``; one forward of
the shared base takes the next batch of up to ``eval_lora_simultaneously_num`` adapters at once,
laid out as contiguous row segments (`BatchLayout`); bare-base rows go after every segment.
Rows are padded on one side: on the right (the default) the real tokens keep positions
0..n-1 and causal attention never sees the padding, so a score equals the unpadded one; on
the left each row's logits are read at its own offset, and rotary models give the same scores
(attention depends on relative positions only) up to float rounding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlora.data import BENCHMARK_TASKS, PROTOCOLS, get_task, load_items, task_sources
from mlora.evaluate.protocols import (
    EvaluationError,
    Row,
    choice_rows,
    continuation_length,
    loglikelihood_rows,
    score_choice,
    score_loglikelihood,
    truncate_left,
)
from mlora.evaluate.results import EvalResults, TaskResult
from mlora.model.context import BatchLayout

BASE = "base"  # the name under which the bare base model is scored


# ------------------------------------------------------------------------------- what to score


class EvalTask(NamedTuple):
    """One benchmark task to score: its name, data source (None: the task's hub dataset), protocol."""

    task: str
    data: object
    protocol: str


@dataclass(frozen=True)
class EvalSpec:
    """One model variant to score and what to score it on.

    Attributes:
        name: the name in the results (the adapter's, or ``base``).
        adapter: the adapter loaded on the model that scores the rows; None = the bare base.
        tasks: the benchmark tasks, each with its source and protocol.
        batch_size: rows of this variant per forward.
    """

    name: str
    adapter: str | None
    tasks: tuple[EvalTask, ...]
    batch_size: int

    def __post_init__(self):
        for t in self.tasks:
            if t.protocol not in PROTOCOLS:
                raise EvaluationError(f"unknown protocol {t.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.batch_size < 1:
            raise EvaluationError(f"{self.name}: evaluate_batch_size must be >= 1, got {self.batch_size}")


def _benchmark_sources(cfg) -> list[tuple[str, object]]:
    pairs = task_sources(cfg.tasks, cfg.data)
    return [(task, data) for task, data in pairs if task in BENCHMARK_TASKS]


def adapter_spec(cfg, protocol: str | None = None) -> EvalSpec | None:
    """What to score adapter `cfg` on: each of its benchmark tasks; None if it has none.

    `protocol` overrides the adapter's own ``protocol`` (its training target).
    """
    tasks = [EvalTask(task, data, protocol or cfg.protocol) for task, data in _benchmark_sources(cfg)]
    if not tasks:
        return None
    return EvalSpec(cfg.name, cfg.name, tuple(tasks), cfg.evaluate_batch_size)


def base_spec(cfgs: Sequence, protocol: str | None = None) -> EvalSpec | None:
    """The bare base model on every benchmark task of `cfgs`, so it can be compared with them.

    Each task is read from the source, and scored with the protocol (unless `protocol` is
    given), of the first adapter that has it.
    """
    tasks: dict[str, EvalTask] = {}
    for cfg in cfgs:
        for task, data in _benchmark_sources(cfg):
            tasks.setdefault(task, EvalTask(task, data, protocol or cfg.protocol))
    if not tasks:
        return None
    batch_size = max(c.evaluate_batch_size for c in cfgs if _benchmark_sources(c))
    return EvalSpec(BASE, None, tuple(tasks.values()), batch_size)


# ----------------------------------------------------------------------------- the batched pass


def _schedule(queues: list[list[list[Row]]], simultaneous: int) -> Iterator[list[tuple[int, list[Row]]]]:
    """Yield forwards: ``[(spec index, rows), ...]`` taking the next batch of up to `simultaneous`
    variants; a variant that runs out of batches leaves its place to the next waiting one."""
    waiting = [i for i, q in enumerate(queues) if q]
    active: list[int] = []
    cursor = [0] * len(queues)
    while waiting or active:
        while waiting and len(active) < simultaneous:
            active.append(waiting.pop(0))
        yield [(i, queues[i][cursor[i]]) for i in active]
        for i in active:
            cursor[i] += 1
        active = [i for i in active if cursor[i] < len(queues[i])]


def _run_batch(model, group: list[tuple[EvalSpec, list[Row]]], pad_id: int, padding_side: str,
               device) -> list[tuple[Row, list[float]]]:
    """One forward over the rows of several variants; returns each row's scores.

    Adapter rows form one segment per adapter; bare-base rows go last, outside every segment
    (uncovered rows get the frozen model). Scores: `score_choice` of a ``labels`` row (one per
    label), ``[score_loglikelihood]`` of a ``sequence`` row.
    """
    group = sorted(group, key=lambda g: g[0].adapter is None)
    rows = [row for _, batch in group for row in batch]
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        offset = width - len(row.ids) if padding_side == "left" else 0
        input_ids[b, offset:offset + len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        mask[b, offset:offset + len(row.ids)] = 1
        offsets.append(offset)
    layout = BatchLayout.from_sizes([(spec.adapter, len(batch)) for spec, batch in group if spec.adapter is not None])
    logits = model(input_ids.to(device), mask.to(device), layout).logits  # (B, T, V)
    out = []
    for b, row in enumerate(rows):
        positions = [offsets[b] + p for p in row.positions]
        if row.kind == "labels":
            out.append((row, score_choice(logits[b, positions[0]], row.targets).tolist()))
        else:
            out.append((row, [score_loglikelihood(logits[b, positions], row.targets)]))
    return out


def _prepare(tokenizer, specs: Sequence[EvalSpec], split: str, limit: int | None,
             max_length: int | None) -> tuple[list[TaskResult], list[list[list[Row]]]]:
    """Load and tokenize every (spec, task): empty results to fill, and each spec's batches."""
    items_cache: dict = {}
    results: list[TaskResult] = []
    queues: list[list[list[Row]]] = []
    for spec in specs:
        spec_rows: list[Row] = []
        for task, data, protocol in spec.tasks:
            key = (task, os.fspath(data) if isinstance(data, os.PathLike) else data)
            if key not in items_cache:
                items_cache[key] = load_items(task, split, data, limit=limit)
            owner = len(results)
            result = TaskResult(spec.name, task, protocol, get_task(task).split_name(split))
            for index, item in enumerate(items_cache[key]):
                result.answers.append(item.answer)
                result.scores.append([0.0] * len(item.labels))  # an empty continuation keeps 0
                if protocol == "loglikelihood":
                    result.lengths.append([continuation_length(c) for c in item.choices])
                    rows = loglikelihood_rows(tokenizer, item, owner, index)
                else:
                    rows = choice_rows(tokenizer, item, owner, index)
                result.truncated += sum(truncate_left(row, max_length) for row in rows)
                spec_rows.extend(rows)
            results.append(result)
        # Longest first: neighbours in a batch have similar lengths, and memory peaks early.
        spec_rows.sort(key=lambda r: -len(r.ids))
        queues.append([spec_rows[i:i + spec.batch_size] for i in range(0, len(spec_rows), spec.batch_size)])
    return results, queues


def evaluate(model, tokenizer, specs: Sequence[EvalSpec], *, simultaneous: int = 1, limit: int | None = None,
             split: str = "eval", padding_side: str = "right", max_length: int | None = None,
             model_name: str | None = None, progress: bool = False) -> EvalResults:
    """Score every spec on each of its tasks in shared batched forwards.

    Args:
        model: a `MultiAdapterModel` carrying the adapters the specs name.
        tokenizer: the base model's tokenizer.
        specs: what to score (`adapter_spec`, `base_spec`).
        simultaneous: variants per forward (``eval_lora_simultaneously_num``).
        limit: score only the first `limit` items of each task.
        split: ``eval`` (each task's evaluation split) or a literal split name.
        padding_side: ``right`` or ``left``; scores do not depend on it.
        max_length: rows longer than this lose tokens on the left; None: the model's
            ``max_position_embeddings`` (no cut if it has none).
        model_name: recorded in the results.
        progress: show a progress bar over forwards.
    Returns:
        `EvalResults` with one `TaskResult` per (spec, task), in order.
    Raises:
        EvaluationError, DataError: bad input (unknown task, unreadable data, ...).
    """
    if padding_side not in ("left", "right"):
        raise EvaluationError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if simultaneous < 1:
        raise EvaluationError(f"simultaneous must be >= 1, got {simultaneous}")
    missing = [s.adapter for s in specs if s.adapter is not None and s.adapter not in model.configs]
    if missing:
        raise EvaluationError(f"adapter(s) {', '.join(missing)} are not loaded on the model")
    if max_length is None:
        max_length = getattr(getattr(model.model, "config", None), "max_position_embeddings", None)
    start = time.perf_counter()
    results, queues = _prepare(tokenizer, specs, split, limit, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    forwards = list(_schedule(queues, simultaneous))
    bar = _progress_bar(len(forwards), progress)
    letter_sequences: set[tuple[int, int]] = set()  # choice items whose letters are several tokens
    was_training = model.training
    model.eval()  # no dropout, no router jitter; restored for a caller that is training
    try:
        with torch.no_grad():
            for forward in forwards:
                group = [(specs[i], rows) for i, rows in forward]
                for row, scores in _run_batch(model, group, pad_id, padding_side, device):
                    if row.kind == "labels":
                        results[row.owner].scores[row.item] = scores
                    else:
                        results[row.owner].scores[row.item][row.choice] = scores[0]
                        if results[row.owner].protocol == "choice":
                            letter_sequences.add((row.owner, row.item))
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    for owner, index in letter_sequences:  # restrict the letters' log-likelihoods to the item's letters
        results[owner].scores[index] = torch.log_softmax(torch.tensor(results[owner].scores[index]), -1).tolist()
    return EvalResults(results, model_name, split, limit, padding_side, time.perf_counter() - start)


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="batch", dynamic_ncols=True)


def evaluate_adapters(model, tokenizer, adapters: Sequence, protocol: str | None = None, limit: int | None = None,
                      *, simultaneous: int = 1, include_base: bool = False, **options) -> EvalResults:
    """Score loaded adapters on each of their benchmark tasks (casual tasks are skipped).

    Args:
        model: a `MultiAdapterModel` on which every adapter of `adapters` is loaded.
        tokenizer: the base model's tokenizer.
        adapters: adapter configs (`LoraConfig` / `MixLoraConfig`); a multi-task adapter is
            scored on each of its tasks separately.
        protocol: ``choice`` | ``loglikelihood`` for all; None: each adapter's own ``protocol``.
        limit: at most this many items per task.
        simultaneous: adapters per forward (``eval_lora_simultaneously_num``).
        include_base: also score the bare base model on all those tasks (named ``base``).
        options: passed to `evaluate` (split, padding_side, max_length, model_name, progress).
    Raises:
        EvaluationError: no adapter has a benchmark task.
    """
    specs = [s for s in (adapter_spec(cfg, protocol) for cfg in adapters) if s is not None]
    if include_base:
        specs += [s for s in [base_spec(adapters, protocol)] if s is not None]
    if not specs:
        names = ", ".join(f"{c.name} ({c.task_name})" for c in adapters) or "none given"
        raise EvaluationError(f"nothing to evaluate: no benchmark task among the adapters ({names}); "
                              f"benchmarks are {', '.join(BENCHMARK_TASKS)}")
    return evaluate(model, tokenizer, specs, simultaneous=simultaneous, limit=limit, **options)
