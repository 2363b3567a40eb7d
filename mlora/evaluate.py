"""Scoring adapters on the benchmarks: the `choice` and `loglikelihood` protocols, one batched pass.

Protocols (DESIGN.md section 6):

* ``choice`` (the MixLoRA paper's): the model reads the lettered prompt; at the position that
  predicts the answer letter, only this item's own label tokens compete (an ARC item with 3
  choices is scored over " A", " B", " C"). The label token ids come from `split_ids`, the
  boundary training used, so evaluation reads exactly the token training targeted.
* ``loglikelihood`` (lm-evaluation-harness): for each choice, the summed log-probability of
  its continuation given its context. ``acc`` takes the best sum; ``acc_norm`` divides each
  sum by the continuation's length in characters (without the leading space that joins it to
  the context, as the harness counts it). WinoGrande items carry one context per choice and a
  shared continuation, so they are scored the same way.

Batching. Every (adapter, task) turns into rows of token ids: one per item for ``choice`` (the
prompt), one per choice for ``loglikelihood`` (context + continuation minus its last token).
Each adapter's rows are sorted by length and cut into batches of its ``evaluate_batch_size``;
one forward of the shared base takes the next batch of up to ``eval_lora_simultaneously_num``
adapters at once, laid out as contiguous row segments (`BatchLayout`). Rows are padded on one
side: on the right (the default) the real tokens keep positions 0..n-1 and causal attention
never sees the padding, so a score is the same as the unpadded one; on the left each row's
logits are read at its own offset, and rotary models give the same scores (attention depends
on relative positions only) up to float rounding.

Results: `EvalResults` (one `TaskResult` per adapter and task), `format_table` for the
adapters x tasks table with the average, `save_results` for ``eval_results.json`` / ``.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from mlora.data import BENCHMARK_TASKS, PROTOCOLS, get_task, load_items, split_ids, task_sources
from mlora.model.context import BatchLayout

__all__ = [
    "BASE",
    "RESULTS_STEM",
    "EvalResults",
    "EvalSpec",
    "EvaluationError",
    "TaskResult",
    "adapter_spec",
    "base_spec",
    "continuation_length",
    "evaluate",
    "evaluate_adapters",
    "evaluate_run",
    "format_table",
    "plan_evaluation",
    "save_results",
    "score_choice",
    "score_loglikelihood",
]  # fmt: skip

BASE = "base"  # the name under which the bare base model is scored
RESULTS_STEM = "eval_results"
FORMAT_VERSION = 1


class EvaluationError(ValueError):
    """Evaluation cannot run as asked (no benchmark tasks, unknown or missing adapter, ...)."""


# ------------------------------------------------------------------------------------ scoring


def score_choice(logits: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities of an item's own labels at the answer position.

    Args:
        logits: ``(V,)`` logits at the position that predicts the answer letter.
        label_ids: the K token ids of this item's labels (" A", " B", ...), in choice order.
    Returns:
        ``(K,)`` fp32 log-softmax over those K logits only (the other tokens do not compete).
    """
    picked = logits.float()[torch.as_tensor(list(label_ids), device=logits.device)]
    return torch.log_softmax(picked, dim=-1)


def score_loglikelihood(logits: torch.Tensor, continuation_ids: Sequence[int]) -> float:
    """Summed log-probability of a continuation.

    Args:
        logits: ``(n, V)``: row j holds the logits at the position that predicts
            ``continuation_ids[j]`` (the position of the token just before it).
        continuation_ids: the n >= 1 token ids of the continuation.
    Returns:
        ``sum_j log softmax(logits[j])[continuation_ids[j]]``, computed in fp32.
    """
    targets = torch.as_tensor(list(continuation_ids), device=logits.device)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(log_probs.gather(-1, targets[:, None]).sum())


def continuation_length(continuation: str) -> int:
    """Characters that `acc_norm` divides by: the continuation without its joining space."""
    return max(1, len(continuation.removeprefix(" ")))


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic)."""
    return max(range(len(values)), key=values.__getitem__)


# ------------------------------------------------------------------------------- what to score


@dataclass(frozen=True)
class EvalSpec:
    """One model variant to score and what to score it on.

    Attributes:
        name: the name in the results (the adapter's, or ``base``).
        adapter: the adapter loaded on the model that scores the rows; None = the bare base.
        tasks: ``(task, data source or None)`` per benchmark task.
        protocol: ``choice`` or ``loglikelihood``.
        batch_size: rows of this variant per forward.
    """

    name: str
    adapter: str | None
    tasks: tuple[tuple[str, object], ...]
    protocol: str
    batch_size: int

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise EvaluationError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.batch_size < 1:
            raise EvaluationError(f"{self.name}: evaluate_batch_size must be >= 1, got {self.batch_size}")


def _benchmark_sources(cfg) -> list[tuple[str, object]]:
    pairs = task_sources(cfg.tasks, cfg.data)
    return [(task, data) for task, data in pairs if task in BENCHMARK_TASKS]


def adapter_spec(cfg, protocol: str | None = None) -> EvalSpec | None:
    """What to score adapter `cfg` on: each of its benchmark tasks; None if it has none.

    `protocol` overrides the adapter's own ``protocol`` (its training target).
    """
    tasks = _benchmark_sources(cfg)
    if not tasks:
        return None
    return EvalSpec(cfg.name, cfg.name, tuple(tasks), protocol or cfg.protocol, cfg.evaluate_batch_size)


def base_spec(cfgs: Sequence, protocol: str | None = None) -> EvalSpec | None:
    """The bare base model on every benchmark task of `cfgs` (first source and protocol of each).

    The protocol is `protocol`, or else the first adapter's (a run usually uses one protocol).
    """
    tasks: dict[str, object] = {}
    for cfg in cfgs:
        for task, data in _benchmark_sources(cfg):
            tasks.setdefault(task, data)
    if not tasks:
        return None
    with_tasks = [c for c in cfgs if _benchmark_sources(c)]
    return EvalSpec(BASE, None, tuple(tasks.items()), protocol or with_tasks[0].protocol,
                    max(c.evaluate_batch_size for c in with_tasks))


# ----------------------------------------------------------------------------------------- rows


@dataclass
class _Row:
    """One sequence to run, and what to read from its logits.

    `positions` index `ids`. A ``choice`` row reads the logits of `targets` (this item's label
    ids, in choice order) at its single position; a ``loglikelihood`` row reads the
    log-probability of ``targets[j]`` at ``positions[j]`` for choice `choice`.
    """

    kind: str
    ids: list[int]
    positions: list[int]
    targets: list[int]
    owner: int  # index of the (spec, task) result
    item: int
    choice: int = 0


def _nonempty_context(tokenizer, ids: list[int]) -> list[int]:
    # A continuation needs a position to be predicted from; the harness starts from EOS.
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EvaluationError("an empty context cannot be scored: the tokenizer has no BOS or EOS token")
    return [start]


def _choice_row(tokenizer, item, owner: int, index: int) -> _Row:
    """The row of one item under `choice`: its prompt, read at the last position."""
    contexts, label_ids = set(), []
    for target in item.label_targets:
        context, label = split_ids(tokenizer, item.prompt, target)
        if not label:
            raise EvaluationError(f"{item.task}: label {target!r} adds no token after the prompt")
        contexts.add(tuple(context))
        label_ids.append(label[0])  # a letter is one token; if not, its first token decides
    if len(contexts) != 1:
        raise EvaluationError(f"{item.task}: the tokenizer merges the answer letters into the end of the prompt "
                              "differently per letter, so no single answer position exists; use --protocol loglikelihood")
    if len(set(label_ids)) != len(label_ids):
        raise EvaluationError(
            f"{item.task}: the tokenizer gives the labels {', '.join(repr(t) for t in item.label_targets)} "
            f"the token ids {label_ids}, which repeat, so the choice protocol cannot tell them apart; "
            "use --protocol loglikelihood"
        )
    context = _nonempty_context(tokenizer, list(contexts.pop()))
    return _Row("choice", context, [len(context) - 1], label_ids, owner, index)


def _loglikelihood_rows(tokenizer, item, owner: int, index: int) -> list[_Row]:
    """Rows for one item under `loglikelihood`: one per choice with a non-empty continuation."""
    rows = []
    for k, (context, continuation) in enumerate(item.loglikelihood_requests()):
        context_ids, continuation_ids = split_ids(tokenizer, context, continuation)
        if not continuation_ids:
            continue  # an empty continuation has log-likelihood 0
        context_ids = _nonempty_context(tokenizer, context_ids)
        ids = context_ids + continuation_ids[:-1]
        start = len(context_ids) - 1
        rows.append(_Row("loglikelihood", ids, list(range(start, start + len(continuation_ids))),
                         continuation_ids, owner, index, k))
    return rows


def _truncate_left(row: _Row, max_length: int | None) -> bool:
    """Keep the last `max_length` tokens (the harness's rule); True if the row was cut."""
    if max_length is None or len(row.ids) <= max_length:
        return False
    cut = len(row.ids) - max_length
    if row.positions[0] < cut:
        raise EvaluationError(f"a continuation of {len(row.targets)} tokens does not fit in {max_length} positions")
    row.ids = row.ids[cut:]
    row.positions = [p - cut for p in row.positions]
    return True


# -------------------------------------------------------------------------------------- results


@dataclass
class TaskResult:
    """One adapter on one task.

    Attributes:
        adapter, task, protocol: what was scored, and how.
        split: the split name read ("test" for ARC and OBQA, "validation" for the others).
        answers: the correct choice of each item.
        scores: per item, one score per choice: the restricted log-probability of its letter
            (choice) or the summed log-likelihood of its continuation (loglikelihood).
        lengths: per item, the characters per choice `acc_norm` divides by (loglikelihood only).
        truncated: rows cut on the left to fit the model's positions.
    """

    adapter: str
    task: str
    protocol: str
    split: str
    answers: list[int] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    lengths: list[list[int]] = field(default_factory=list)
    truncated: int = 0

    @property
    def items(self) -> int:
        return len(self.answers)

    @property
    def predictions(self) -> list[int]:
        """The chosen choice of each item (highest score)."""
        return [_argmax(s) for s in self.scores]

    @property
    def norm_predictions(self) -> list[int] | None:
        """The chosen choice by score per character (loglikelihood only)."""
        if self.protocol != "loglikelihood":
            return None
        return [_argmax([s / n for s, n in zip(ss, ns)]) for ss, ns in zip(self.scores, self.lengths)]

    @property
    def correct(self) -> int:
        return sum(p == a for p, a in zip(self.predictions, self.answers))

    @property
    def acc(self) -> float:
        return self.correct / self.items if self.items else float("nan")

    @property
    def acc_norm(self) -> float | None:
        norm = self.norm_predictions
        if norm is None:
            return None
        return sum(p == a for p, a in zip(norm, self.answers)) / self.items if self.items else float("nan")

    def summary(self) -> dict:
        """The JSON record of this result (no per-item scores)."""
        return {"adapter": self.adapter, "task": self.task, "protocol": self.protocol, "split": self.split,
                "items": self.items, "correct": self.correct, "acc": self.acc, "acc_norm": self.acc_norm,
                "truncated": self.truncated}  # fmt: skip


@dataclass
class EvalResults:
    """Everything one evaluation produced; `tasks` is in adapter order, then task order."""

    tasks: list[TaskResult]
    model: str | None = None
    split: str = "eval"
    limit: int | None = None
    padding_side: str = "right"
    seconds: float = 0.0

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(r.adapter for r in self.tasks))

    def result(self, adapter: str, task: str) -> TaskResult:
        for r in self.tasks:
            if r.adapter == adapter and r.task == task:
                return r
        raise KeyError(f"no result for adapter {adapter!r} on task {task!r}")

    def averages(self) -> list[dict]:
        """Per adapter: the unweighted mean over its tasks (the papers' AVG column)."""
        out = []
        for name in self.adapters:
            rows = [r for r in self.tasks if r.adapter == name]
            norms = [r.acc_norm for r in rows]
            out.append({
                "adapter": name, "protocol": rows[0].protocol, "tasks": len(rows),
                "items": sum(r.items for r in rows), "acc": sum(r.acc for r in rows) / len(rows),
                "acc_norm": None if None in norms else sum(norms) / len(rows),
            })  # fmt: skip
        return out

    def to_dict(self) -> dict:
        """The JSON document `save_results` writes (see the README's results format)."""
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "split": self.split,
            "limit": self.limit,
            "padding_side": self.padding_side,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 3),
            "results": [r.summary() for r in self.tasks],
            "averages": self.averages(),
        }


# ----------------------------------------------------------------------------- the batched pass


def _schedule(queues: list[list[list[_Row]]], simultaneous: int) -> Iterator[list[tuple[int, list[_Row]]]]:
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


def _run_batch(model, group: list[tuple[EvalSpec, list[_Row]]], pad_id: int, padding_side: str,
               device) -> list[tuple[_Row, list[float]]]:
    """One forward over the rows of several variants; returns each row's scores.

    Adapter rows form one segment per adapter; bare-base rows go last, outside every segment
    (uncovered rows get the frozen model). Scores: `score_choice` of a choice row (one per
    label), ``[score_loglikelihood]`` of a loglikelihood row.
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
        if row.kind == "choice":
            out.append((row, score_choice(logits[b, positions[0]], row.targets).tolist()))
        else:
            out.append((row, [score_loglikelihood(logits[b, positions], row.targets)]))
    return out


def _prepare(tokenizer, specs: Sequence[EvalSpec], split: str, limit: int | None,
             max_length: int | None) -> tuple[list[TaskResult], list[list[list[_Row]]]]:
    """Load and tokenize every (spec, task): empty results to fill, and each spec's batches."""
    items_cache: dict = {}
    results: list[TaskResult] = []
    queues: list[list[list[_Row]]] = []
    for spec in specs:
        spec_rows: list[_Row] = []
        for task, data in spec.tasks:
            key = (task, os.fspath(data) if isinstance(data, os.PathLike) else data)
            if key not in items_cache:
                items_cache[key] = load_items(task, split, data, limit=limit)
            owner = len(results)
            result = TaskResult(spec.name, task, spec.protocol, get_task(task).split_name(split))
            for index, item in enumerate(items_cache[key]):
                result.answers.append(item.answer)
                result.scores.append([0.0] * len(item.labels))  # an empty continuation keeps 0
                if spec.protocol == "loglikelihood":
                    result.lengths.append([continuation_length(c) for c in item.choices])
                    rows = _loglikelihood_rows(tokenizer, item, owner, index)
                else:
                    rows = [_choice_row(tokenizer, item, owner, index)]
                result.truncated += sum(_truncate_left(row, max_length) for row in rows)
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
    was_training = model.training
    model.eval()  # no dropout, no router jitter; restored for a caller that is training
    try:
        with torch.no_grad():
            for forward in forwards:
                group = [(specs[i], rows) for i, rows in forward]
                for row, scores in _run_batch(model, group, pad_id, padding_side, device):
                    if row.kind == "choice":
                        results[row.owner].scores[row.item] = scores
                    else:
                        results[row.owner].scores[row.item][row.choice] = scores[0]
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
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


# ------------------------------------------------------------------------------------- output


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(results: EvalResults) -> str:
    """The adapters x tasks table (accuracy in %, unweighted average last) as text.

    A loglikelihood adapter gets two lines, ``acc`` and ``acc_norm``; a task an adapter was
    not scored on shows ``-``. A footer gives the item count of each task.
    """
    tasks = list(dict.fromkeys(r.task for r in results.tasks))
    averages = {a["adapter"]: a for a in results.averages()}
    protocols = {a["adapter"]: a["protocol"] for a in averages.values()}
    header = ["adapter", "metric", *tasks, "avg"]
    lines = [header]
    for name in results.adapters:
        metrics = ["acc", "acc_norm"] if protocols[name] == "loglikelihood" else ["acc"]
        for metric in metrics:
            cells = []
            for task in tasks:
                try:
                    cells.append(_percent(getattr(results.result(name, task), metric)))
                except KeyError:
                    cells.append("-")
            lines.append([name if metric == "acc" else "", metric, *cells, _percent(averages[name][metric])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]
    used = sorted(set(protocols.values()))
    title = (f"evaluation: {' and '.join(used)} protocol{'s' if len(used) > 1 else ''}, split {results.split!r}"
             + (f", first {results.limit} items per task" if results.limit else "")
             + (f", model {results.model}" if results.model else ""))
    counts = []
    for task in tasks:
        sizes = sorted({r.items for r in results.tasks if r.task == task})
        split = next(r.split for r in results.tasks if r.task == task)
        counts.append(f"{task} {'/'.join(map(str, sizes))} ({split})")
    return "\n".join([title, *text, "items: " + ", ".join(counts)])


_CSV_FIELDS = ("adapter", "task", "protocol", "split", "items", "correct", "acc", "acc_norm", "truncated")


def _write_atomic(path: Path, text: str) -> None:
    # Write-then-rename: an interrupted run never leaves half a results file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_results(results: EvalResults, folder, stem: str = RESULTS_STEM) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (`EvalResults.to_dict`) and ``<stem>.csv`` into `folder`.

    The CSV has one line per adapter and task (columns: adapter, task, protocol, split, items,
    correct, acc, acc_norm, truncated) and one ``average`` line per adapter. Returns both paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    _write_atomic(json_path, json.dumps(results.to_dict(), indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in [r.summary() for r in results.tasks]:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    for avg in results.averages():
        writer.writerow({"adapter": avg["adapter"], "task": "average", "protocol": avg["protocol"],
                         "items": avg["items"], "acc": avg["acc"],
                         "acc_norm": "" if avg["acc_norm"] is None else avg["acc_norm"]})  # fmt: skip
    _write_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


# ------------------------------------------------------------------------------ run level


def _has_benchmark(cfg) -> bool:
    return any(task in BENCHMARK_TASKS for task in cfg.tasks)


def plan_evaluation(run_config, output_dir, adapters: Sequence[str] | None = None,
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
        import difflib

        hints = [f"{n!r}" + (f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(n, list(by_name), 1)) else "")
                 for n in unknown]
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


def evaluate_run(model, tokenizer, run_config, output_dir, base_model_name: str | None = None, *,
                 adapters: Sequence[str] | None = None, protocol: str | None = None, limit: int | None = None,
                 require_tasks: bool = True, stem: str = RESULTS_STEM, progress: bool = True,
                 echo=print) -> EvalResults | None:
    """Score the saved adapters of a run, print the table and save it into `output_dir`.

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
        stem: results file name stem (``<stem>.json`` and ``<stem>.csv``).
        progress: show a progress bar.
        echo: where the table and file names are printed.
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
                           limit=limit, model_name=base_model_name, progress=progress)
    finally:
        for name in loaded:
            model.remove_adapter(name)
    json_path, csv_path = save_results(results, output_dir, stem)
    echo(format_table(results))
    echo(f"results: {json_path} and {csv_path}")
    return results


def results_stem(adapter: str | None = None, protocol: str | None = None) -> str:
    """``eval_results``, ``eval_results_<adapter>``, ``..._<protocol>``: a partial or re-scored
    evaluation does not overwrite the full one."""
    return "_".join([RESULTS_STEM] + [part for part in (adapter, protocol) if part])


def evaluate_saved(base_model: str, run_config, output_dir, *, adapters: Sequence[str] | None = None,
                   protocol: str | None = None, limit: int | None = None, dtype: str | None = None,
                   quantize: str | None = None, device: str | None = None, stem: str = RESULTS_STEM,
                   progress: bool = True, echo=print) -> EvalResults | None:
    """`launch.py evaluate`: check the plan, load the base model, then `evaluate_run`.

    `dtype` None is bf16 on a CUDA device that supports it, else fp32 (as `launch.py run`).
    Raises EvaluationError, DataError, ModelLoadError, AdapterFileError on bad input.
    """
    from mlora.model.adapted import MultiAdapterModel
    from mlora.model.loading import load_base_model

    plan_evaluation(run_config, output_dir, adapters)  # fail before the (slow) model load
    if dtype is None:
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        dtype = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    model, tokenizer = load_base_model(base_model, dtype=dtype, quantize=quantize, device=device)
    return evaluate_run(MultiAdapterModel(model), tokenizer, run_config, output_dir, base_model,
                        adapters=adapters, protocol=protocol, limit=limit, stem=stem, progress=progress, echo=echo)


def evaluate_trained(summary, run_config, base_model_name: str | None, echo=print) -> EvalResults | None:
    """`launch.py run`, after training: score every adapter that finished (now or in an
    earlier run) and has a benchmark task, on the model and tokenizer training used.

    `summary` is the trainer's `TrainSummary`; returns None when nothing was scored.
    """
    done = [a.name for a in summary.adapters.values() if a.status in ("finished", "done-before")]
    if not done or summary.model is None:
        return None
    return evaluate_run(summary.model, summary.tokenizer, run_config, summary.output_dir, base_model_name,
                        adapters=done, require_tasks=False, echo=echo)
