"""Running `launch.py run` in two processes for the distributed tests, and watching them.

`run_session` starts N spawned processes that play torchrun's part (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT set as torchrun sets them) and run one or more
scenarios in turn, each a `launch.py run` command line, paying for interpreter start-up
and imports once; `torchrun_entry.py` runs the same scenarios under torchrun itself. Each scenario may ask one rank to raise, to kill itself with SIGKILL or to
receive SIGINT after a given number of its optimizer steps. Ranks other than 0 record every
write they make under the scenario's output folder (a Python audit hook), which must be none.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.unlink", "shutil.rmtree",
                "os.truncate", "os.symlink", "os.link", "shutil.copyfile", "shutil.move"}


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on this machine now (one rendezvous per scenario)."""
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _audit(roots: list[str], writes: list):
    def hook(event, args):
        if not args:
            return
        path = args[0]
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if not any(path.startswith(root) for root in roots):
            return
        if event == "open":
            mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                writes.append(f"open({mode!r}) {path}")
        elif event in WRITE_EVENTS:
            writes.append(f"{event} {path}")

    return hook


def nan_loss_at(adapter: str, epoch: int, batch: int, micro: int):
    """Wrap the trainer's `adapter_loss` so that `adapter`'s micro-batch at (epoch, batch,
    micro) has a non-finite loss; `micro` counts from the step's first micro-batch (a rank's
    own offset in data parallelism)."""
    import mlora.train.trainer as trainer

    original = trainer.adapter_loss

    def adapter_loss(ar, token_loss, router_entries, rows):
        loss, aux = original(ar, token_loss, router_entries, rows)
        pos = ar.position
        if (ar.name, pos.epoch, pos.batch, pos.micro) == (adapter, epoch, batch, micro):
            loss = loss * float("nan")
        return loss, aux

    return adapter_loss


def _patch_steps(rank: int, scenario: dict) -> None:
    """Make this rank raise, die or get SIGINT after its n-th optimizer step, or see a
    non-finite loss (``nan``: ``at`` = [adapter, epoch, batch, micro]), as asked."""
    import mlora.train.trainer as trainer

    original = getattr(trainer, "_original_optimizer_step", trainer.optimizer_step)
    trainer._original_optimizer_step = original
    trainer.optimizer_step = original
    trainer.adapter_loss = getattr(trainer, "_original_adapter_loss", trainer.adapter_loss)
    trainer._original_adapter_loss = trainer.adapter_loss
    action = scenario.get("action")
    if action is None or scenario.get("rank", 1) != rank:
        return
    if action == "nan":
        trainer.adapter_loss = nan_loss_at(*scenario["at"])
        return
    count = {"n": 0}
    after = scenario["after_steps"]

    def step(ar, epoch):
        original(ar, epoch)
        count["n"] += 1
        if count["n"] == after:
            if action == "raise":
                raise RuntimeError("injected failure")
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "sigint":
                signal.raise_signal(signal.SIGINT)

    trainer.optimizer_step = step


def run_scenarios(rank: int, scenarios: list[dict], results: str, ports: list[int] | None = None) -> int:
    """Run `scenarios` in this process (one rank of the group), writing a record of each into
    `results`; returns the last exit status. `ports`: one rendezvous port per scenario (None:
    the launcher's ``MASTER_PORT`` for all)."""
    import torch

    torch.set_num_threads(1)
    from mlora.cli import main

    writes: list[str] = []
    roots = [os.path.abspath(s["output_dir"]) for s in scenarios]
    if rank != 0:
        sys.addaudithook(_audit(roots, writes))
    code = 0
    for i, scenario in enumerate(scenarios):
        if ports is not None:
            os.environ["MASTER_PORT"] = str(ports[i])
        _patch_steps(rank, scenario)
        out, err = io.StringIO(), io.StringIO()
        started, start = time.time(), time.perf_counter()
        before = len(writes)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(scenario["argv"])
            except SystemExit as stop:
                code = stop.code
        record = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "started": started,
                  "seconds": time.perf_counter() - start, "writes": writes[before:]}
        Path(results, f"{i}-{rank}.json").write_text(json.dumps(record))
    return code


def _session(rank: int, size: int, ports: list[int], scenarios: list[dict], results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1")
    run_scenarios(rank, scenarios, results, ports)


def read_records(results: Path, count: int, size: int) -> list[list[dict | None]]:
    """Per scenario, per rank: its record, or None (the rank died before writing it)."""
    out = []
    for i in range(count):
        row = []
        for r in range(size):
            path = results / f"{i}-{r}.json"
            row.append(json.loads(path.read_text()) if path.exists() else None)
        out.append(row)
    return out


def run_session(scenarios: list[dict], results: Path, size: int = 2, timeout: float = 600) -> list[list[dict | None]]:
    """Run `scenarios` in `size` spawned processes; per scenario, per rank: the record (exit
    code, stdout, stderr, seconds, writes) or None (the rank was killed before it finished).

    Each scenario: ``argv`` (the `launch.py` arguments), ``output_dir``, and optionally
    ``action`` (``raise`` | ``kill`` | ``sigint``), ``rank`` (default 1), ``after_steps``.
    """
    results.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(scenarios))
    ctx = multiprocessing.get_context("spawn")
    # Two OpenMP pools on two cores stall each other: one thread per process, set before torch loads.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=_session, args=(r, size, ports, scenarios, str(results))) for r in range(size)]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"the distributed session did not end within {timeout} s")
    return read_records(results, len(scenarios), size)
