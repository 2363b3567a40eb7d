"""Child processes under a time limit: at the limit the child's whole process group ends.

A benchmark worker can start helpers of its own (torch.compile's compile workers, pytest's
children); killing only the direct child would leave them holding CPUs or GPU memory. Each
child therefore starts its own session, and the group is sent SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

GRACE_S = 5.0  # between SIGTERM and SIGKILL


@dataclass
class Finished:
    """How a child ended. ``output`` is its stdout and stderr, unless they went to a log file."""

    returncode: int | None
    timed_out: bool
    seconds: float
    output: str = ""


def run_limited(cmd: list[str], timeout: float | None, *, env: dict | None = None, cwd: str | Path | None = None,
                log: Path | None = None) -> Finished:
    """Run `cmd` for at most `timeout` seconds (None: no limit); stdout and stderr together.

    With `log`, the output is appended to that file instead of returned. If this process is
    interrupted meanwhile (Ctrl-C, SIGTERM turned into an exception), the child ends too.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(log, "a")) if log is not None else subprocess.PIPE
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _end_group(proc)
            out, _ = proc.communicate()
            timed_out = True
        except BaseException:
            _end_group(proc)
            proc.wait()
            raise
    return Finished(proc.returncode, timed_out, time.monotonic() - started, out or "")


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the group, a grace period for the child, then SIGKILL to whatever is left of the group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
