"""How much of the CPU other processes took while we measured, and waiting for a quiet machine.

CPU timings on a shared machine are only as good as the machine is idle: two OpenMP threads
on two cores stall whenever another process takes a core. The harness records, for each
configuration's timed steps, the share of all CPUs that other processes kept busy, and can
wait for (and retry until) a quiet machine. Linux only (``/proc/stat``); elsewhere the
figures are None and nothing waits.
"""

from __future__ import annotations

import os
import time


def cpu_seconds(children: bool = False) -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process, all threads).

    With `children`, waited-for child processes count as this process. None where
    ``/proc/stat`` is missing (not Linux).
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    busy = sum(fields[:3]) + sum(fields[5:8])
    t = os.times()
    own = t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)
    return busy / os.sysconf("SC_CLK_TCK"), own


def other_cpu_share(before, after, wall: float) -> float | None:
    """Fraction of all CPUs that other processes (or the hypervisor) kept busy over `wall` seconds."""
    if before is None or after is None or wall <= 0:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(other, 0.0) / (wall * (os.cpu_count() or 1)), 3)


def wait_for_quiet(max_wait: float, threshold: float = 0.05, window: float = 15.0, poll: float = 5.0) -> float:
    """Sleep until other processes used less than `threshold` of the CPUs for `window` seconds.

    Gives up after `max_wait` seconds. Returns the seconds waited. The caller must be idle
    meanwhile (its own CPU time is subtracted anyway).
    """
    started = time.perf_counter()
    quiet_since = None
    while time.perf_counter() - started < max_wait:
        before, t0 = cpu_seconds(children=True), time.perf_counter()
        time.sleep(poll)
        share = other_cpu_share(before, cpu_seconds(children=True), time.perf_counter() - t0)
        if share is None:
            break
        if share < threshold:
            quiet_since = quiet_since or t0
            if time.perf_counter() - quiet_since >= window:
                break
        else:
            quiet_since = None
    return round(time.perf_counter() - started, 1)
