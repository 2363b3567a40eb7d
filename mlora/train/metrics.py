"""Training metrics: one JSONL file per adapter, TensorBoard (when installed), a progress bar.

A metrics line is written per optimizer step::

    {"step": 12, "epoch": 0, "loss": 1.93, "aux_loss": 0.0, "lr": 0.0003, "grad_norm": 0.41,
     "tokens": 812, "seconds": 0.21}

and an event line for anything unusual (``{"step": 13, "event": "nan_loss", ...}``).
`tokens` counts the adapter's real (non-padding) tokens in that optimizer batch, `seconds`
the wall time since its previous step. On resume, lines past the checkpoint are dropped so
the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path

import torch

logger = logging.getLogger("mlora.train")


class MetricsLog:
    """Appends one adapter's metrics to the JSONL file `path` and, if `tensorboard_dir` is
    given (TensorBoard installed), to event files in that folder."""

    def __init__(self, path: Path, tensorboard_dir: Path | None, keep_until: int | None):
        """`keep_until`: None starts the file afresh; a step keeps the lines up to it (resume).
        The caller has checked that `path` may be replaced (`RunFolder.check_replaceable`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        lines = []
        if keep_until is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= keep_until:
                    lines.append(line + "\n")
        self.path.write_text("".join(lines), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = _tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None

    def step(self, record: dict) -> None:
        """Write one optimizer step's metrics (``step`` required)."""
        self._write(record)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def event(self, step: int, event: str, **details) -> None:
        """An unusual step (``nan_loss``, ``stopped``, ...) or a score (``eval``, with its ``task``)."""
        self._write({"step": step, "event": event, **details})
        if self._tb is not None:
            prefix = f"{event}/{details['task']}" if "task" in details else event
            for key, value in details.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def console_logging(rank: int | None = None) -> None:
    """Show mlora's INFO messages on stderr, once; other libraries' loggers are left alone.

    `rank`: in a multi-process run, ranks other than 0 show warnings and errors only, each
    line prefixed with ``[rank N]`` (rank 0 tells the story once)."""
    package = logging.getLogger("mlora")
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s" if not rank else f"[rank {rank}] %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO if not rank else logging.WARNING)


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(folder))


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Progress:
    """A tqdm bar over all adapters' micro-batches, showing per-adapter loss and lr,
    tokens/s and memory. ``enabled=False`` (tests, pipes) writes nothing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="mb", desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        self.latest: dict[str, str] = {}

    def adapter(self, name: str, loss: float, lr: float) -> None:
        self.latest[name] = f"{loss:.3f}@{lr:.1e}"

    def forget(self, name: str) -> None:
        self.latest.pop(name, None)

    def update(self, micro_batches: int, tokens_per_s: float, memory: float) -> None:
        if self.bar is None:
            return
        shown = dict(list(self.latest.items())[:4])  # keep the line readable with many adapters
        self.bar.set_postfix({**shown, "tok/s": f"{tokens_per_s:.0f}", "mem": f"{memory:.2f}G"}, refresh=False)
        self.bar.update(micro_batches)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
