"""How the trainer's steps are spread over processes: one, ``data`` or ``adapter`` parallelism.

`fit` (`mlora.train.trainer`) calls the same hooks in every mode; `Parallel` is one process
and communicates nothing (every hook is the plain single-process action), so a run without
torchrun behaves exactly as before and pays for nothing.

``parallelism: data`` (`DataParallel`): every rank holds every active adapter. An adapter's
optimizer batch is dealt out a whole micro-batch per rank: in one global step rank r trains
micro-batch ``micro + r`` of the batch (`deal`; ranks past the batch's end sit it out), so N
ranks consume N micro-batches per step and ``batch_size`` is the global batch on any N.
Whole micro-batches rather than rows, because everything random or pooled in the forward is
a function of the micro-batch: an adapter's dropout masks and router jitter come from a
stream seeded by its data position and drawn over the micro-batch's real tokens in order,
MixLoRA experts draw theirs over the micro-batch's routed pairs grouped by expert, and the
router balance loss is a product of means over its tokens. A micro-batch trained whole on one
rank gets all of that exactly as in one process, with no change to the forward and no
collective inside it. Gradients of the adapters whose batch completes are summed over the
ranks (`GradReducer`, launched during backward), so are the loss sums, token counts and
non-finite flags; then every rank clips and steps identically (clipping and the non-finite
check see the global gradient). The cost: a batch of fewer micro-batches than ranks leaves
ranks idle for that adapter (``batch_size / micro_batch_size`` should be a multiple of N).

``parallelism: adapter`` (`AdapterParallel`): the adapters are dealt to ranks by estimated
cost (`mlora.train.dispatcher.adapter_cost`, `distributed.partition`); each rank trains its
own with its own dispatcher and no gradient traffic. The ranks advance in lockstep, one global
step at a time, so that a checkpoint is one consistent cut; after each step rank 0 collects
the others' metrics lines and finished adapters (their files, as bytes) and writes them.

Only rank 0 writes into the output folder, in every mode; the others hold a `FollowerFolder`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from mlora.config import LoraConfig, RunConfig
from mlora.io import save_adapter
from mlora.train import checkpoint as ckpt
from mlora.train import distributed as dist_
from mlora.train.data import AdapterData, Position, TrainError
from mlora.train.dispatcher import Dispatcher, adapter_cost
from mlora.train.metrics import MetricsLog, tensorboard_available

if TYPE_CHECKING:
    from mlora.evaluate.batched import Shard
    from mlora.run_folder import RunFolder
    from mlora.train.distributed import World
    from mlora.train.setup import TrainOptions
    from mlora.train.state import AdapterRun

logger = logging.getLogger("mlora.train")


@dataclass(frozen=True)
class Share:
    """What one global step does with one adapter's data.

    Attributes:
        positions: the micro-batches the step consumes (all ranks together), in data order.
        mine: the micro-batch this rank trains, or None (it sits this adapter out).
        after: the adapter's position after the step.
        completes: the step closes the adapter's optimizer batch.
    """

    positions: tuple[Position, ...]
    mine: Position | None
    after: Position
    completes: bool


def deal(data: AdapterData, pos: Position, ranks: int, rank: int) -> Share:
    """The next up to `ranks` micro-batches of the optimizer batch at `pos`, one per rank."""
    positions, after, done = [], pos, False
    while len(positions) < ranks and not done:
        positions.append(after)
        after, done = data.advance(after)
    return Share(tuple(positions), positions[rank] if rank < len(positions) else None, after, done)


class StepEnd(NamedTuple):
    """What the ranks agree on after a step: whether to checkpoint, whether any adapter is
    left anywhere, and the micro-batches and real tokens trained in it (all ranks)."""

    checkpoint_due: bool
    left: bool
    micro_batches: int
    tokens: int


def open_metrics(folder: RunFolder, name: str, keep_until: int | None) -> MetricsLog:
    """Adapter `name`'s metrics log (and TensorBoard events), recorded in the run manifest."""
    tensorboard = folder.tensorboard / name if tensorboard_available() else None
    metrics = MetricsLog(folder.logs / f"{name}.jsonl", tensorboard, keep_until=keep_until)
    for path in (metrics.path, tensorboard):
        if path is not None:
            folder.created(path, growing=True)  # appended to step by step
    return metrics


class NullLog:
    """A metrics log that writes nothing: data-parallel ranks other than 0 (rank 0 logs the
    same, globally reduced, values)."""

    def __init__(self, path: Path):
        self.path = path

    def step(self, record: dict) -> None:
        pass

    def event(self, step: int, event: str, **details) -> None:
        pass

    def close(self) -> None:
        pass


class RelayLog(NullLog):
    """A metrics log whose lines travel to rank 0 (``parallelism: adapter``), which writes them."""

    def __init__(self, path: Path, name: str, outbox: list):
        super().__init__(path)
        self.name, self.outbox = name, outbox

    def step(self, record: dict) -> None:
        self.outbox.append(("step", self.name, record))

    def event(self, step: int, event: str, **details) -> None:
        self.outbox.append(("event", self.name, step, event, details))

    def close(self) -> None:
        self.outbox.append(("close", self.name))


def adapter_files(model, name: str, base_model: str | None) -> dict[str, bytes]:
    """Adapter `name` as `save_adapter` writes it, as relative path -> bytes (written into a
    temporary folder of this machine, never into the run's output folder)."""
    with tempfile.TemporaryDirectory(prefix="mlora-adapter-") as tmp:
        save_adapter(model, name, tmp, base_model)
        return {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


# ====================================================================== one process
class Parallel:
    """One process: every hook is the plain single-process action."""

    world: World | None = None
    fsdp = False

    @property
    def writes(self) -> bool:
        """Whether this rank writes files and draws progress (rank 0, or the only process)."""
        return self.world is None or self.world.leader

    def dispatcher(self, resume: ckpt.Resume, todo: list[LoraConfig]) -> Dispatcher:
        """This rank's queue: a fresh one, or the checkpoint's (adapters added to the config since join its end)."""
        if resume.dispatcher is None:
            return Dispatcher([a.name for a in todo])
        dispatcher = Dispatcher.from_state(resume.dispatcher)
        known = set(dispatcher.active) | set(dispatcher.waiting)
        names = {a.name for a in todo}
        dispatcher.waiting = [n for n in dispatcher.waiting if n in names]
        dispatcher.waiting += [a.name for a in todo if a.name not in known]
        return dispatcher

    def share(self, ar: AdapterRun) -> Share:
        return deal(ar.data, ar.position, 1, 0)

    def agree_step(self, signal: int | None, busy: bool) -> tuple[int | None, bool]:
        """``(stop signal, idle)`` at the top of a step: the signal received by any rank, and
        whether no rank has an adapter left to train."""
        return signal, not busy

    def metrics_log(self, folder: RunFolder, name: str, keep_until: int | None):
        return open_metrics(folder, name, keep_until)

    def activated(self, ar: AdapterRun) -> None:
        """Adapter `ar` was loaded (its parameters exist)."""

    def unloaded(self, name: str) -> None:
        """Adapter `name` was removed from the model."""

    def before_backward(self, completing: list[AdapterRun]) -> None:
        """`completing`: the adapters whose optimizer batch this step's backward closes."""

    def after_backward(self, completing: list[AdapterRun]) -> None:
        """Their gradients and accumulated loss sums are now global (data parallelism)."""

    def end_step(self, run, checkpoint_due: bool, micro_batches: int, tokens: int, progress) -> StepEnd:
        return StepEnd(checkpoint_due, bool(run.active or run.dispatcher.waiting), micro_batches, tokens)

    def write_checkpoint(self, run, state: dict, states: dict[str, dict]) -> Path:
        return ckpt.write_checkpoint(run.folder, run.dispatcher.step, state, run.model, states,
                                     run.options.base_model)

    def local_state(self, state: dict) -> dict:
        """An adapter's checkpointed trainer state as this rank restores it."""
        return state

    def write_final(self, run, name: str, info: dict) -> Path:
        return ckpt.write_final_adapter(run.folder, run.model, name, run.options.base_model, info)

    def merge_summaries(self, summaries: dict) -> dict:
        return summaries

    def scoring_shard(self) -> Shard | None:
        """How scoring during training (``evaluate_steps``) is split over the ranks (None: not split)."""
        return None

    def close(self) -> None:
        """Training ended (finished or stopped): release what the mode holds open."""


def check_resume(resume: ckpt.Resume, mode: str, world: World | None) -> None:
    """Refuse to resume a checkpoint of ``parallelism: adapter`` with another layout: its
    dispatch state is one queue per rank, and the adapters sharing a batch would change.
    `mode`: the config's ``parallelism`` (one process counts as ``data``)."""
    layout = resume.distributed or {"parallelism": "data", "world_size": 1}
    size = world.size if world is not None else 1
    mode = mode if world is not None else "data"
    if resume.checkpoint is None or layout["parallelism"] == "data" and mode == "data":
        return
    if layout["parallelism"] != mode or layout["world_size"] != size:
        raise TrainError(
            f"the checkpoint {resume.checkpoint} was written with parallelism '{layout['parallelism']}' over "
            f"{layout['world_size']} process(es); this run has parallelism '{mode}' over {size}. With 'adapter' "
            "every process keeps its own adapters and queue, so a resume needs the same parallelism and the same "
            f"number of processes (torchrun --nproc_per_node {layout['world_size']}); a 'data' checkpoint "
            "continues on any number of processes")


# ====================================================================== data parallelism
class DataParallel(Parallel):
    """Every rank holds every adapter; each optimizer batch's micro-batches are dealt out."""

    def __init__(self, world: World, fsdp: bool):
        self.world, self.fsdp = world, fsdp
        self.reducer = dist_.GradReducer(world)

    def share(self, ar: AdapterRun) -> Share:
        return deal(ar.data, ar.position, self.world.size, self.world.rank)

    def agree_step(self, signal, busy):
        # Every rank holds the same adapters: only a signal (received by some ranks) differs.
        (stop,) = dist_.all_reduce(self.world, [signal or 0], "max")
        return (int(stop) or None), not busy

    def metrics_log(self, folder, name, keep_until):
        return super().metrics_log(folder, name, keep_until) if self.writes else NullLog(folder.logs / f"{name}.jsonl")

    def activated(self, ar):
        self.reducer.add(ar.name, ar.params)

    def unloaded(self, name):
        self.reducer.remove(name)

    def before_backward(self, completing):
        self.reducer.arm([ar.name for ar in completing])

    def after_backward(self, completing):
        if not completing:
            return
        self.reducer.finish()
        values = [v for ar in completing for v in (ar.accum_loss, ar.accum_aux, ar.accum_tokens, float(ar.accum_bad))]
        sums = dist_.all_reduce(self.world, values)
        for i, ar in enumerate(completing):
            loss, aux, tokens, bad = sums[4 * i:4 * i + 4]
            ar.accum_loss, ar.accum_aux, ar.accum_tokens, ar.accum_bad = loss, aux, int(tokens), bad > 0

    def write_checkpoint(self, run, state, states):
        """Rank 0 writes; each rank's partial gradients and loss sums of an unfinished
        accumulation are kept per rank (an exact resume on as many ranks) and summed (a resume
        on any other number continues from the sum: the same up to float reduction order)."""
        parts = {name: {"grads": s["grads"], "accumulation": s["accumulation"]} for name, s in states.items()}
        gathered = dist_.gather_object(self.world, parts)
        if not self.writes:
            return ckpt.checkpoint_dir(run.folder, run.dispatcher.step)
        for name, s in states.items():
            by_rank = [g[name] for g in gathered]
            s["grads"] = _sum_grads([p["grads"] for p in by_rank])
            accum = [p["accumulation"] for p in by_rank]
            s["accumulation"] = {"loss": sum(a["loss"] for a in accum), "aux": sum(a["aux"] for a in accum),
                                 "tokens": sum(a["tokens"] for a in accum), "bad": any(a["bad"] for a in accum)}
            s["by_rank"] = by_rank
        state["distributed"] = {"parallelism": "data", "world_size": self.world.size}
        return super().write_checkpoint(run, state, states)

    def local_state(self, state):
        by_rank = state.get("by_rank")
        if by_rank is not None and len(by_rank) == self.world.size:
            return {**state, **by_rank[self.world.rank]}
        if self.world.leader:
            return state  # the sums: the other ranks start this accumulation from zero
        return {**state, "grads": {}, "accumulation": {"loss": 0.0, "aux": 0.0, "tokens": 0, "bad": False}}

    def write_final(self, run, name, info):
        return super().write_final(run, name, info) if self.writes else run.folder.adapter(name)

    def scoring_shard(self):
        from mlora.evaluate.batched import Shard

        return Shard(self.world.rank, self.world.size, lockstep=self.fsdp)


def _sum_grads(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for grads in per_rank:  # in rank order: one fixed summation order
        for key, g in grads.items():
            total[key] = g.clone() if key not in total else total[key] + g
    return total


# ====================================================================== adapter parallelism
class AdapterParallel(Parallel):
    """Each rank trains its own adapters; the ranks step in lockstep and rank 0 writes.

    Attributes:
        owner: adapter name -> the rank that trains it.
    """

    def __init__(self, world: World, owner: dict[str, int]):
        self.world, self.owner = world, owner
        self.outbox: list = []              # messages for rank 0, sent after each step
        self.remote_logs: dict[str, MetricsLog] = {}  # rank 0: the logs of other ranks' adapters

    @classmethod
    def plan(cls, world: World, resume: ckpt.Resume, todo: list[LoraConfig], prepared: dict) -> AdapterParallel:
        """Deal `todo` to the ranks by cost, or keep the checkpoint's deal (new adapters dealt after)."""
        owner = dict((resume.distributed or {}).get("owner", {}))
        new = {a.name: adapter_cost(a, prepared[a.name]) for a in todo if a.name not in owner}
        loads = [0.0] * world.size
        for a in todo:
            if a.name in owner:
                loads[owner[a.name]] += adapter_cost(a, prepared[a.name])
        owner.update(dist_.partition(new, world.size, loads))
        mine = [a.name for a in todo if owner[a.name] == world.rank]
        idle = world.size - len({owner[a.name] for a in todo})
        if idle > 0 and world.leader:
            logger.warning("parallelism 'adapter': %d adapter(s) to train over %d processes; %d of them have none",
                           len(todo), world.size, idle)
        logger.info("rank %d trains %s", world.rank, ", ".join(mine) or "nothing")
        return cls(world, owner)

    def dispatcher(self, resume: ckpt.Resume, todo: list[LoraConfig]) -> Dispatcher:
        names = [a.name for a in todo if self.owner[a.name] == self.world.rank]
        states = (resume.distributed or {}).get("dispatchers")
        if states is None:
            return Dispatcher(names)
        dispatcher = Dispatcher.from_state(states[self.world.rank])
        known = set(dispatcher.active) | set(dispatcher.waiting)
        dispatcher.waiting = [n for n in dispatcher.waiting if n in names] + [n for n in names if n not in known]
        return dispatcher

    def agree_step(self, signal, busy):
        stop, busy_any = dist_.all_reduce(self.world, [signal or 0, float(busy)], "max")
        return (int(stop) or None), busy_any == 0

    def metrics_log(self, folder, name, keep_until):
        if self.writes:
            return super().metrics_log(folder, name, keep_until)
        self.outbox.append(("open", name, keep_until))
        return RelayLog(folder.logs / f"{name}.jsonl", name, self.outbox)

    def end_step(self, run, checkpoint_due, micro_batches, tokens, progress):
        left = bool(run.active or run.dispatcher.waiting)
        due, left_any = dist_.all_reduce(self.world, [float(checkpoint_due), float(left)], "max")
        self.outbox.append(("progress", micro_batches, tokens))
        gathered = dist_.gather_object(self.world, self.outbox)
        self.outbox.clear()
        if self.writes:
            micro_batches, tokens = self._apply(run, gathered, progress)
        return StepEnd(due > 0, left_any > 0, micro_batches, tokens)

    def _apply(self, run, gathered: list[list], progress) -> tuple[int, int]:
        """Rank 0: write what the other ranks sent; returns the step's micro-batches and tokens."""
        micro_batches = tokens = 0
        for rank, messages in enumerate(gathered):
            for kind, *rest in messages:
                if kind == "progress":
                    micro_batches, tokens = micro_batches + rest[0], tokens + rest[1]
                elif rank == 0:
                    continue  # rank 0's own lines went straight to its files
                elif kind == "open":
                    self.remote_logs[rest[0]] = open_metrics(run.folder, rest[0], rest[1])
                elif kind == "step":
                    self.remote_logs[rest[0]].step(rest[1])
                    if rest[1].get("loss") is not None:
                        progress.adapter(rest[0], rest[1]["loss"], rest[1]["lr"])
                elif kind == "event":
                    name, step, event, details = rest
                    self.remote_logs[name].event(step, event, **details)
                elif kind == "close":
                    self.remote_logs.pop(rest[0]).close()
                    progress.forget(rest[0])
                elif kind == "final":
                    name, files, info = rest
                    ckpt.write_final_adapter(run.folder, None, name, run.options.base_model, info, files=files)
        return micro_batches, tokens

    def write_final(self, run, name, info):
        if self.writes:
            return super().write_final(run, name, info)
        self.outbox.append(("final", name, adapter_files(run.model, name, run.options.base_model), info))
        return run.folder.adapter(name)

    def write_checkpoint(self, run, state, states):
        """Every rank's adapters (files and trainer states), queue and bookkeeping, written by
        rank 0 as one checkpoint of the global step."""
        base = run.options.base_model
        files = {} if self.writes else {n: adapter_files(run.model, n, base) for n in states}
        part = {"dispatcher": state["dispatcher"], "positions": state["positions"], "finished": state["finished"],
                "failed": state["failed"], "states": states, "files": files}
        gathered = dist_.gather_object(self.world, part)
        if not self.writes:
            return ckpt.checkpoint_dir(run.folder, run.dispatcher.step)
        merged = dict(state)
        queues = [g["dispatcher"] for g in gathered]
        merged["dispatcher"] = {"waiting": [n for q in queues for n in q["waiting"]],
                                "active": [n for q in queues for n in q["active"]],
                                "turn": [n for q in queues for n in q["turn"]], "step": state["dispatcher"]["step"]}
        merged["positions"] = {n: p for g in gathered for n, p in g["positions"].items()}
        merged["finished"] = sorted({n for g in gathered for n in g["finished"]})
        merged["failed"] = {n: m for g in gathered for n, m in g["failed"].items()}
        merged["distributed"] = {"parallelism": "adapter", "world_size": self.world.size, "owner": self.owner,
                                 "dispatchers": queues}
        all_states = {n: s for g in gathered for n, s in g["states"].items()}
        all_files = {n: f for g in gathered for n, f in g["files"].items()}
        return ckpt.write_checkpoint(run.folder, run.dispatcher.step, merged, run.model, all_states, base,
                                     files=all_files)

    def close(self):
        for log in self.remote_logs.values():  # adapters interrupted mid-training
            log.close()
        self.remote_logs.clear()

    def merge_summaries(self, summaries):
        gathered = dist_.all_gather_object(self.world, summaries)
        return {n: gathered[self.owner.get(n, 0)][n] for n in summaries}


def check_options(config: RunConfig, options: TrainOptions, world: World | None) -> None:
    """Refuse flag and key combinations that cannot be spread (before anything loads)."""
    if options.fsdp and (world is None or config.parallelism != "data"):
        where = "start the run with torchrun --nproc_per_node N" if world is None else "set parallelism 'data'"
        raise TrainError(f"--fsdp shards the base over the processes of a 'data' parallel run: {where}")
    if options.fsdp and options.quantize:
        raise TrainError("--fsdp cannot shard a bitsandbytes-quantized base; drop --quantize or --fsdp")
    dora = [a.name for a in config.lora if a.use_dora or (a.is_moe and a.expert_settings().use_dora)]
    if options.fsdp and dora:
        raise TrainError(f"--fsdp: adapter(s) {', '.join(dora)} use DoRA, whose magnitudes start from the full base "
                         "weights outside any forward, which a sharded base does not hold; train them without --fsdp")


def make_parallel(config: RunConfig, world: World | None, fsdp: bool, resume: ckpt.Resume, todo: list[LoraConfig],
                  prepared: dict) -> Parallel:
    """The `Parallel` of a run: one process, or the config's ``parallelism`` over `world`."""
    if world is None:
        par = Parallel()
    elif config.parallelism == "data":
        par = DataParallel(world, fsdp)
        few = [f"{a.name} ({a.batch_size // a.micro_batch_size})" for a in todo
               if (a.batch_size // a.micro_batch_size) % world.size]
        if few and world.leader:
            logger.warning("parallelism 'data' over %d processes deals each optimizer batch out a micro-batch per "
                           "process; micro-batches per batch not a multiple of %d leave processes idle: %s "
                           "(lower micro_batch_size)", world.size, world.size, ", ".join(few))
    else:
        par = AdapterParallel.plan(world, resume, todo, prepared)
    return par
