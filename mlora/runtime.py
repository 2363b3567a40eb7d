"""Process-wide settings for training on CPU.

glibc's malloc hands every allocation above its mmap threshold (at most 32 MB by default)
straight to the kernel and returns it on free, and trims the heap's top when much of it is
free. A training step allocates and frees the same large activations every step, so each
step paid the kernel's page faults again to zero fresh pages (measured in
docs/benchmarks.md, "The allocator"). `tune_cpu_allocator` raises both thresholds so
freed memory stays in the process and is reused. Peak memory is unchanged in kind (the
same tensors are alive at the peak); memory freed after the peak is not given back to the
system until the process ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30          # 1 GiB: larger single tensors still come from, and go back to, the kernel
OPT_OUT_ENV = "MLORA_SYSTEM_MALLOC"
_ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc on Linux); returns True when applied.

    Does nothing when ``MLORA_SYSTEM_MALLOC`` is set to a non-empty value, when the user set
    glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or off glibc.
    """
    if os.environ.get(OPT_OUT_ENV) or any(k in os.environ for k in _ENV_SETTINGS) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
