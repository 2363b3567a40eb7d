"""The batched pass: many adapters (and the bare base) scored in shared forwards.

Every (adapter, task) turns into rows of token ids (`mlora.evaluate.protocols`). Each adapter's
rows are sorted by length and cut into batches of its ``evaluate_batch_size``; one forward of
the shared base takes the next batch of up to ``eval_lora_simultaneously_num`` adapters at once,
laid out as contiguous row segments (`BatchLayout`); bare-base rows go after every segment.

The forward gets each row's own positions and attention: plain causal rows with a padding
mask, and for rows where the choices of an item share their context (`protocols.sequence_rows`)
a 4-D mask that keeps each choice's block to the context and itself. Rows are padded on the
left (the default) so that every position a score is read at sits in the last columns, and
the LM head runs on those columns only (``logits_to_keep``), not on every position. With
explicit positions the padding side does not change a score.

Over several processes (a torchrun launch), `Shard` deals the forwards out to the ranks and
gathers every score back, so each rank ends with the same results a single process computes
(the same rows in the same forwards, hence the same scores).

``share_context=False`` keeps the earlier plain layout: one row per choice, no explicit
positions, logits at every position. It is slower and serves as the reference the shared
layout is checked and timed against (`bench/eval_throughput.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlora.config import LoraConfig, MixLoraConfig
from mlora.data import BENCHMARK_TASKS, PROTOCOLS, get_task, load_items, pad_rows, task_sources
from mlora.evaluate.protocols import (
    NO_LIMIT,
    EvaluationError,
    Read,
    Row,
    choice_rows,
    loglikelihood_rows,
    score_choice,
    truncate_left,
)
from mlora.evaluate.results import EvalResults, TaskResult
from mlora.model.context import BatchLayout

BASE = "base"  # the name under which the bare base model is scored


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation over the ranks of a process group.

    Rank r runs forwards r, r + size, ...; the scores are then all-gathered (torch.distributed's
    default group). `lockstep`: every rank runs the same number of forwards, repeating one
    whose scores it drops (a base sharded with FSDP needs every rank in every forward).
    """

    rank: int
    size: int
    lockstep: bool = False

    def forwards(self, total: int) -> list[int | None]:
        """The indices of the forwards this rank runs (None: a repeated one, scores dropped)."""
        mine: list[int | None] = list(range(self.rank, total, self.size))
        if self.lockstep:
            mine += [None] * (-(-total // self.size) - len(mine))
        return mine


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


def _benchmark_sources(cfg: LoraConfig) -> list[tuple[str, object]]:
    pairs = task_sources(cfg.tasks, cfg.data)
    return [(task, data) for task, data in pairs if task in BENCHMARK_TASKS]


def adapter_spec(cfg: LoraConfig, protocol: str | None = None) -> EvalSpec | None:
    """What to score adapter `cfg` on: each of its benchmark tasks; None if it has none.

    `protocol` overrides the adapter's own ``protocol`` (its training target).
    """
    tasks = [EvalTask(task, data, protocol or cfg.protocol) for task, data in _benchmark_sources(cfg)]
    if not tasks:
        return None
    return EvalSpec(cfg.name, cfg.name, tuple(tasks), cfg.evaluate_batch_size)


def base_spec(cfgs: Sequence[LoraConfig], protocol: str | None = None) -> EvalSpec | None:
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


def _run_batch(model, group: list[tuple[EvalSpec, list[Row]]], pad_id: int, padding_side: str, device,
               plain: bool) -> list[tuple[Row, Read, list[float]]]:
    """One forward over the rows of several variants; returns every read with its scores.

    Adapter rows form one segment per adapter; bare-base rows go last, outside every segment
    (uncovered rows get the frozen model). Scores: `score_choice` of a ``labels`` read (one
    per label), ``[summed log-likelihood]`` of a ``sequence`` read. `plain`: the reference
    forward (no explicit positions, logits at every position).
    """
    group = sorted(group, key=lambda g: g[0].adapter is None)
    rows = [row for _, batch in group for row in batch]
    input_ids, real, offsets = pad_rows([row.ids for row in rows], pad_id, padding_side)
    sizes = [(spec.adapter, len(batch)) for spec, batch in group if spec.adapter is not None]
    if plain:
        logits = model(input_ids.to(device), real.long().to(device), BatchLayout.from_sizes(sizes)).logits
        first = 0
    else:
        logits, first = _forward_kept(model, rows, input_ids, real, offsets, padding_side, sizes, device)
    # Column c of row b is column offsets[b] + c - first of `logits`.
    reads = [(b, read) for b, row in enumerate(rows) for read in row.reads]
    out = [(rows[b], read, score_choice(logits[b, offsets[b] + read.columns[0] - first], read.targets).tolist())
           for b, read in reads if rows[b].kind == "labels"]
    sequences = [(b, read) for b, read in reads if rows[b].kind == "sequence"]
    if sequences:
        sums = _sequence_sums(logits, [(b, [offsets[b] + c - first for c in read.columns], read.targets)
                                       for b, read in sequences])
        out.extend((rows[b], read, [value]) for (b, read), value in zip(sequences, sums))
    return out


def _sequence_sums(logits: torch.Tensor, reads: list[tuple[int, list[int], list[int]]]) -> list[float]:
    """For each ``(row, columns, targets)``: sum_j log softmax(logits[row, columns[j]])[targets[j]],
    in fp32, with one log-softmax per distinct position (the choices of an item share the one
    that predicts their first token)."""
    rows = torch.tensor([b for b, columns, _ in reads for _ in columns])
    columns = torch.tensor([c for _, cs, _ in reads for c in cs])
    targets = torch.tensor([t for _, _, ts in reads for t in ts], device=logits.device)
    owner = torch.tensor([i for i, (_, cs, _) in enumerate(reads) for _ in cs], device=logits.device)
    keys, where = torch.unique(rows * logits.shape[1] + columns, return_inverse=True)
    picked = logits[(keys // logits.shape[1]).to(logits.device), (keys % logits.shape[1]).to(logits.device)]
    log_probs = torch.log_softmax(picked.float(), dim=-1)[where.to(logits.device), targets]
    sums = torch.zeros(len(reads), dtype=torch.float32, device=logits.device).index_add_(0, owner, log_probs)
    return sums.tolist()


def _forward_kept(model, rows: list[Row], input_ids, real, offsets: list[int], padding_side: str, sizes, device):
    """The forward with each row's own positions and attention, and logits for the last columns
    only: as many as the row whose first read is furthest from its end needs.

    Returns ``(logits (B, K, V), the index of the first kept column)``.
    """
    width = input_ids.shape[1]
    positions = pad_rows([row.positions() for row in rows], 0, padding_side).values
    keep = max(width - offsets[b] - row.first_read() for b, row in enumerate(rows))
    if any(row.blocks for row in rows):
        dtype = model.model.get_input_embeddings().weight.dtype
        mask = _block_mask(rows, padding_side, dtype if dtype.is_floating_point else torch.float32)
    else:
        mask = real.long()
    # The layout is installed for this one call (`MultiAdapterModel.forward` has no positions,
    # 4-D masks or logits_to_keep to pass); its router logits are dropped (nothing trains).
    layout = BatchLayout.from_sizes(sizes, token_mask=real.to(device))
    with model.context.scope(layout):
        out = model.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                          position_ids=positions.to(device), logits_to_keep=keep, use_cache=False)
    return out.logits, width - keep


def _block_mask(rows: list[Row], padding_side: str, dtype: torch.dtype) -> torch.Tensor:
    """The additive ``(B, 1, T, T)`` attention mask of rows with blocks (`Row.segments`): 0 where
    a query may see a key, the dtype's minimum elsewhere. Padding sees itself only, so that no
    softmax row is empty; its outputs are never read."""
    segment = pad_rows([row.segments() for row in rows], -1, padding_side).values
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros((len(rows), 1, width, width), dtype=dtype)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def _share_within(model, spec: EvalSpec, max_length: int | None) -> int | None:
    """The longest request for which the choices of an item may share a row; None: never.

    A shared row needs a custom attention mask (eager or sdpa attention); that mask leaves out
    any sliding window, so every request must fit in the window; and a mixlora-switch adapter
    counts expert capacity per row, so its choices keep one row each.
    """
    config = getattr(model.model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return None
    cfg = model.configs.get(spec.adapter)
    if isinstance(cfg, MixLoraConfig) and cfg.routing_strategy == "mixlora-switch":
        return None
    return min((n for n in (max_length, _sliding_window(model)) if n is not None), default=NO_LIMIT)


def _sliding_window(model) -> int | None:
    config = getattr(model.model, "config", None)
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


def _forwards_of(group: list[tuple[EvalSpec, list[Row]]], windowed: bool) -> list[list[tuple[EvalSpec, list[Row]]]]:
    """The batches of one scheduled forward, as one forward; as two on a sliding-window model when
    they mix shared and plain rows: the 4-D mask of shared rows leaves the window out, which a
    plain row longer than the window needs (each batch holds one kind, see `_batches`)."""
    if not windowed:
        return [group]
    parts = [[g for g in group if bool(g[1][0].blocks) == shared] for shared in (False, True)]
    return [part for part in parts if part]


def _batches(rows: list[Row], size: int) -> list[list[Row]]:
    # Longest first: neighbours in a batch have similar lengths, and memory peaks early. Shared
    # rows (usually the longer ones) batch apart from plain ones (see `_forwards_of`).
    out = []
    for shared in (True, False):
        kind = sorted((r for r in rows if bool(r.blocks) == shared), key=lambda r: -len(r.ids))
        out += [kind[i:i + size] for i in range(0, len(kind), size)]
    return out


def _prepare(model, tokenizer, specs: Sequence[EvalSpec], split: str, limit: int | None,
             max_length: int | None, share_context: bool) -> tuple[list[TaskResult], list[list[list[Row]]]]:
    """Load and tokenize every (spec, task): empty results to fill, and each spec's batches."""
    items_cache: dict = {}
    results: list[TaskResult] = []
    queues: list[list[list[Row]]] = []
    for spec in specs:
        share_within = _share_within(model, spec, max_length) if share_context else None
        spec_rows: list[Row] = []
        for task, data, protocol in spec.tasks:
            key = (task, os.fspath(data) if isinstance(data, os.PathLike) else data)
            if key not in items_cache:
                items_cache[key] = load_items(task, split, data, limit=limit)
            owner = len(results)
            info = get_task(task)
            result = TaskResult(spec.name, task, protocol, info.split_name(split), metrics=info.metrics(protocol))
            rows_of = loglikelihood_rows if protocol == "loglikelihood" else choice_rows
            for index, item in enumerate(items_cache[key]):
                result.add_item(item)  # an empty continuation keeps its score 0
                rows = rows_of(tokenizer, item, owner, index, share_within)
                result.truncated += sum(truncate_left(row, max_length) for row in rows)
                spec_rows.extend(rows)
            results.append(result)
        queues.append(_batches(spec_rows, spec.batch_size))
    return results, queues


def evaluate(model, tokenizer, specs: Sequence[EvalSpec], *, simultaneous: int = 1, limit: int | None = None,
             split: str = "eval", padding_side: str = "left", max_length: int | None = None,
             model_name: str | None = None, progress: bool = False, share_context: bool = True,
             shard: Shard | None = None) -> EvalResults:
    """Score every spec on each of its tasks in shared batched forwards.

    Args:
        model: a `MultiAdapterModel` carrying the adapters the specs name.
        tokenizer: the base model's tokenizer.
        specs: what to score (`adapter_spec`, `base_spec`).
        simultaneous: variants per forward (``eval_lora_simultaneously_num``).
        limit: score only the first `limit` items of each task.
        split: ``eval`` (each task's evaluation split) or a literal split name.
        padding_side: ``left`` or ``right``; scores do not depend on it (``left`` keeps the
            positions that are read together at the end, so the head runs on fewer columns).
        max_length: rows longer than this lose tokens on the left; None: the model's
            ``max_position_embeddings`` (no cut if it has none).
        model_name: recorded in the results.
        progress: show a progress bar over forwards.
        share_context: score the choices of an item in one row that holds their shared
            context once, and run the head at the read positions only (see the module
            docstring); False: the plain reference layout, one row per choice.
        shard: this rank's part when several processes share the work (None: all of it).
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
    results, queues = _prepare(model, tokenizer, specs, split, limit, max_length, share_context)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    forwards = list(_schedule(queues, simultaneous))
    order = shard.forwards(len(forwards)) if shard is not None else list(range(len(forwards)))
    bar = _progress_bar(len(order), progress and (shard is None or shard.rank == 0))
    scored: list[tuple[int, int, int | None, list[float]]] = []  # (owner, item, choice or None, scores)
    was_training = model.training
    model.eval()  # no dropout, no router jitter; restored for a caller that is training
    try:
        with torch.no_grad():
            windowed = _sliding_window(model) is not None
            for index in order:
                forward = forwards[index if index is not None else 0]
                for group in _forwards_of([(specs[i], rows) for i, rows in forward], windowed):
                    for row, read, scores in _run_batch(model, group, pad_id, padding_side, device, not share_context):
                        if index is not None:
                            scored.append((row.owner, row.item, None if row.kind == "labels" else read.choice, scores))
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if shard is not None:
        import torch.distributed as dist

        gathered: list = [None] * shard.size
        dist.all_gather_object(gathered, scored)
        scored = [entry for part in gathered for entry in part]
    letter_sequences: set[tuple[int, int]] = set()  # choice items whose letters are several tokens
    for owner, item, choice, scores in scored:
        if choice is None:
            results[owner].scores[item] = scores
        else:
            results[owner].scores[item][choice] = scores[0]
            if results[owner].protocol == "choice":
                letter_sequences.add((owner, item))
    for owner, index in letter_sequences:  # restrict the letters' log-likelihoods to the item's letters
        results[owner].scores[index] = torch.log_softmax(torch.tensor(results[owner].scores[index]), -1).tolist()
    return EvalResults(results, model_name, split, limit, padding_side, time.perf_counter() - start)


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="batch", dynamic_ncols=True)


def evaluate_adapters(model, tokenizer, adapters: Sequence[LoraConfig], protocol: str | None = None, limit: int | None = None,
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
