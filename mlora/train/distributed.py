"""Several processes, one run: the process group that ``torchrun`` starts, and its collectives.

``torchrun --nproc_per_node N launch.py run ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. `init_world` joins
them into one process group (gloo for CPU tensors, NCCL for CUDA ones); a plain ``python
launch.py run`` has no ``WORLD_SIZE`` above 1, gets no group, and pays for nothing here.

What lives here (torch.distributed does the communication; nothing is home-made):

* `World`: this process's rank, the group size, its device; `init_world` / `close_world`.
* Collectives with a bounded wait (every group is made with the run's timeout): `agree`
  runs a setup phase on every rank and turns a problem on any of them into one message
  from rank 0; `on_leader` runs a phase on rank 0 only and hands its result (or its
  problem) to the others; small helpers for flags and Python objects.
* `GradReducer`: sums adapters' gradients over the ranks (``all_reduce``), bucketed and
  launched from gradient hooks while backward still runs, as DDP does.
* `FollowerFolder`: what ranks other than 0 see of the output folder: its paths, no writes.
* `partition`: adapters dealt to ranks by estimated cost, for ``parallelism: adapter``.
* `shard_base`: FSDP2 ``fully_shard`` over each decoder layer of the frozen base.

A rank that raises ends its process; its peers, blocked in their next collective, get an
error from the backend (or reach the timeout) and stop too, naming themselves (`lost_contact`).
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mlora.errors import MloraError
from mlora.model.loading import default_device
from mlora.run_folder import RunFolder, open_run_folder

logger = logging.getLogger("mlora.train")

DEFAULT_TIMEOUT_S = 1800.0  # a collective waits this long for a slow or stuck peer
BUCKET_BYTES = 25 * 2**20   # DDP's default bucket size


class DistributedError(MloraError):
    """A multi-process run cannot go on (a peer failed, a setting cannot be spread); the
    message names the rank that reports it."""


class FollowerStop(MloraError):
    """Raised on ranks other than 0 when rank 0 reports a problem for the whole job: the
    process exits with the same status, silently (rank 0 printed the message)."""


@dataclass
class World:
    """This process's place in a multi-process run.

    Attributes:
        rank: 0 .. size - 1; rank 0 alone writes files and draws progress.
        size: number of processes (``WORLD_SIZE``).
        local_rank: index on this machine (``LOCAL_RANK``): the CUDA device it uses.
        backend: ``gloo`` or ``cpu:gloo,cuda:nccl``.
        timeout_s: how long any collective waits for its peers.
        grad_group: a second group for the gradient all-reduces, so that they can run while
            other collectives (FSDP's all-gathers) are in flight without their order mixing.
    """

    rank: int
    size: int
    local_rank: int
    backend: str
    timeout_s: float
    grad_group: object = field(default=None, repr=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0


def torchrun_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_world(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> World | None:
    """Join the process group torchrun describes in the environment; None for one process.

    Args:
        device: the ``--device`` flag (None: CUDA when available). On CUDA each rank takes
            ``cuda:LOCAL_RANK`` and gradients travel over NCCL; control messages always over gloo.
        timeout_s: the longest any collective waits for the other ranks.
    Raises:
        DistributedError: torchrun's variables are incomplete, or an explicit ``cuda:K``
            device was given (every rank would use the same device).
    """
    size = torchrun_size()
    if size <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set; start several "
                               "processes with torchrun (torchrun --nproc_per_node N launch.py run ...)")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device is not None and re.fullmatch(r"cuda:\d+", device):
        raise DistributedError(f"rank {rank}: --device {device} names one GPU for every process; give --device cuda "
                               "(each process takes cuda:LOCAL_RANK)")
    cuda = default_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout)
    grad_group = dist.new_group(backend="nccl" if cuda else "gloo", timeout=timeout)  # gradients only
    return World(rank, size, local, backend, timeout_s, grad_group)


def close_world(world: World | None) -> None:
    """Leave the process group (no-op for one process)."""
    if world is not None and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(requested: str | None, world: World | None) -> str | None:
    """The ``--device`` a rank uses: ``cuda`` (or the CUDA default) becomes ``cuda:LOCAL_RANK``."""
    if world is None:
        return requested
    if default_device(requested).type == "cuda":
        return f"cuda:{world.local_rank}"
    return requested


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another rank died, left or timed out."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset", "timed out", "Timed out",
                                  "Broken pipe", "NCCL communicator was aborted"))


def lost_contact(world: World, err: BaseException) -> str:
    """The message of a rank whose collective failed: a peer died, raised, or did not answer."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # gloo's text: "[.../pair.cc:553] Connection closed by peer [addr]:port. This is typically ..."
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]
    return (f"rank {world.rank}: lost contact with the other processes ({first}); another rank stopped or did not "
            f"answer within {world.timeout_s:g} s (--dist_timeout); its own message says why")


# ------------------------------------------------------------------------------- collectives
def all_reduce(world: World, values: list[float], op: str = "sum") -> list[float]:
    """`values` summed (``op="sum"``) or their maximum (``"max"``) over the ranks, each rank
    with its own list of the same length (float64 on the CPU: exact for counts and flags)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def all_gather_object(world: World, obj) -> list:
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather_object(world: World, obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order); None elsewhere."""
    out = [None] * world.size if world.leader else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(world: World, obj=None):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World | None) -> None:
    if world is not None:
        dist.barrier()


def agree(world: World | None, work: Callable[[], object]):
    """Run `work()` on every rank; if it raises a user-facing problem (`MloraError`) on any
    rank, every rank stops: rank 0 with its own problem or the first rank's (named), the
    others silently (`FollowerStop`).

    Returns what `work()` returned on this rank.
    """
    if world is None:
        return work()
    value, problem = None, None
    try:
        value = work()
    except MloraError as err:
        problem = err
    found = [(r, p) for r, p in enumerate(all_gather_object(world, None if problem is None else str(problem)))
             if p is not None]
    if not found:
        return value
    if not world.leader:
        raise FollowerStop("stopped by rank 0's message")
    if problem is not None:
        raise problem
    rank, message = found[0]
    raise DistributedError(f"rank {rank}: {message}")


def on_leader(world: World | None, work: Callable[[], object]):
    """Run `work()` on rank 0 only and return its result on every rank; its problem
    (`MloraError`) stops every rank, reported once by rank 0 as it was raised."""
    if world is None:
        return work()
    value, problem = None, None
    if world.leader:
        try:
            value = work()
        except MloraError as err:
            problem = err
    value, failed = broadcast_object(world, (value, problem is not None))
    if problem is not None:
        raise problem
    if failed:
        raise FollowerStop("stopped by rank 0's message")
    return value


# ------------------------------------------------------------------------------- the folder
class FollowerFolder(RunFolder):
    """The output folder as ranks other than 0 see it: the same paths, no lock, no writes.

    Any write is a bug (only rank 0 writes) and raises at once, so a test catches it.
    """

    def __init__(self, root: Path, rank: int):
        super().__init__(root, {})
        self._rank = rank

    def _refuse(self, *args, **kwargs):
        raise AssertionError(f"rank {self._rank} tried to write into the output folder {self.root}; only rank 0 writes")

    created = remove = write_text = replace_dir = _save_manifest = _refuse


@contextlib.contextmanager
def opened_folder(root, world: World | None) -> Iterator[RunFolder]:
    """`open_run_folder` on rank 0 (lock, manifest); a `FollowerFolder` elsewhere. A folder
    that cannot be opened stops every rank, reported by rank 0."""
    if world is None:
        with open_run_folder(root) as folder:
            yield folder
        return
    if not world.leader:
        if broadcast_object(world):
            raise FollowerStop("stopped by rank 0's message")
        yield FollowerFolder(Path(root), world.rank)
        return
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(open_run_folder(root))
        except MloraError:
            broadcast_object(world, True)
            raise
        broadcast_object(world, False)
        yield folder


# ------------------------------------------------------------------------------- gradients
def _layer_of(key: str) -> int:
    """The decoder layer index in a parameter key (``model.layers.3.mlp...`` -> 3), -1 if none."""
    found = re.search(r"\.layers\.(\d+)\.", key)
    return int(found.group(1)) if found else -1


@dataclass(eq=False)
class _Bucket:
    adapter: str
    index: int
    layer: int  # the deepest layer of its parameters: backward reaches it first
    params: list[nn.Parameter]
    ready: int = 0
    flat: torch.Tensor | None = None
    work: object = None


class GradReducer:
    """Sums the gradients of chosen adapters over the ranks, DDP-style.

    Each adapter's parameters are cut into buckets of about `bucket_bytes`, deepest layer
    first (the order backward produces their gradients). Before a backward, `arm` names the
    adapters whose optimizer batch completes in this step; a gradient hook counts each of
    their parameters as its gradient is accumulated, and a bucket whose parameters are all
    in is flattened and all-reduced asynchronously while backward goes on. Buckets start in
    one fixed order on every rank (a collective must match its peers'), so a bucket waits for
    the ones before it. `finish` starts what is left (parameters that got no gradient on this
    rank count as zero), waits, and writes the sums back into ``.grad``. A parameter no rank
    has a gradient for keeps ``grad = None``, as one process would (the optimizer skips it).

    `wait_s` accumulates the time spent waiting in `finish`: communication backward did not hide.
    """

    def __init__(self, world: World, bucket_bytes: int = BUCKET_BYTES):
        self.world = world
        self.bucket_bytes = bucket_bytes
        self._buckets: dict[str, list[_Bucket]] = {}
        self._hooks: dict[str, list] = {}
        self._owner: dict[nn.Parameter, _Bucket] = {}
        self._queue: list[_Bucket] = []
        self._armed: set[int] = set()
        self._next = 0
        self.wait_s = 0.0

    def add(self, name: str, params: dict[str, nn.Parameter]) -> None:
        """Register adapter `name`'s trainable parameters (keyed as `adapter_parameters` keys them)."""
        buckets: list[_Bucket] = []
        size, current, layer = 0, [], -1
        for key, p in reversed(list(params.items())):  # registration order is layer by layer
            if current and (size + p.numel() * p.element_size() > self.bucket_bytes or p.dtype != current[0].dtype):
                buckets.append(_Bucket(name, len(buckets), layer, current))
                size, current, layer = 0, [], -1
            current.append(p)
            size += p.numel() * p.element_size()
            layer = max(layer, _layer_of(key))
        if current:
            buckets.append(_Bucket(name, len(buckets), layer, current))
        self._buckets[name] = buckets
        self._hooks[name] = [p.register_post_accumulate_grad_hook(self._on_grad) for b in buckets for p in b.params]
        for b in buckets:
            for p in b.params:
                self._owner[p] = b

    def remove(self, name: str) -> None:
        for handle in self._hooks.pop(name, []):
            handle.remove()
        for b in self._buckets.pop(name, []):
            for p in b.params:
                self._owner.pop(p, None)

    def arm(self, names: list[str]) -> None:
        """Before backward: the adapters (the same list on every rank) to reduce after it."""
        order = {n: i for i, n in enumerate(names)}
        self._queue = sorted((b for n in names for b in self._buckets[n]),
                             key=lambda b: (-b.layer, order[b.adapter], b.index))
        for b in self._queue:
            b.ready, b.flat, b.work = 0, None, None
        self._armed = {id(b) for b in self._queue}
        self._next = 0

    def _on_grad(self, p: nn.Parameter) -> None:
        b = self._owner.get(p)
        if b is None or id(b) not in self._armed:
            return  # mid-accumulation, or another adapter: nothing to send yet
        b.ready += 1
        self._launch(force=False)

    def _launch(self, force: bool) -> None:
        while self._next < len(self._queue):
            b = self._queue[self._next]
            if not force and b.ready < len(b.params):
                return
            p0 = b.params[0]
            # Gradients, then one presence flag per parameter: a sum of 0 means no rank had one.
            parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                 device=p.device) for p in b.params]
            parts.append(torch.tensor([float(p.grad is not None) for p in b.params], dtype=p0.dtype, device=p0.device))
            b.flat = torch.cat(parts)
            b.work = dist.all_reduce(b.flat, group=self.world.grad_group, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """After backward: every armed bucket reduced and written back into ``.grad``."""
        start = time.perf_counter()
        self._launch(force=True)
        for b in self._queue:
            b.work.wait()
            offset, present = 0, b.flat[-len(b.params):]
            for p, flag in zip(b.params, present.tolist()):
                n = p.numel()
                p.grad = b.flat[offset:offset + n].view_as(p) if flag > 0 else None
                offset += n
            b.flat, b.work = None, None
        self._queue, self._armed = [], set()
        self.wait_s += time.perf_counter() - start


# ------------------------------------------------------------------------------- adapters to ranks
def partition(costs: dict[str, float], ranks: int, loads: list[float] | None = None) -> dict[str, int]:
    """Deal adapters to `ranks` so that each rank's summed cost is close to the others'.

    Longest-processing-time first: the costliest adapter goes to the least loaded rank
    (ties: config order, lowest rank). Deterministic, so every rank computes the same plan.
    `loads`: what each rank already carries (adapters dealt before). Returns name -> rank.
    """
    position = {n: i for i, n in enumerate(costs)}
    heap = [(load, r) for r, load in enumerate(loads or [0.0] * ranks)]
    heapq.heapify(heap)
    plan = {}
    for name in sorted(costs, key=lambda n: (-costs[n], position[n])):
        load, r = heapq.heappop(heap)
        plan[name] = r
        heapq.heappush(heap, (load + costs[name], r))
    return {n: plan[n] for n in costs}


# ------------------------------------------------------------------------------- sharded base
def shard_base(model: nn.Module, world: World, device: torch.device) -> None:
    """FSDP2: shard the frozen base over the ranks, one ``fully_shard`` unit per decoder layer
    plus the root (embeddings, final norm, head). Call before any adapter is added: adapters
    stay ordinary replicated parameters that `GradReducer` sums.

    Each unit's parameters are all-gathered just before its forward (and again in backward)
    and freed after, so a rank holds ``1/size`` of the base plus one layer at a time.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mlora.model.adapted import decoder_layers

    mesh = init_device_mesh(device.type, (world.size,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info("FSDP: the base is sharded over %d processes (%d decoder layers); this one holds %d of its %d "
                "parameters", world.size, len(layers), held, total)
