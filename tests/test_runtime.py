"""The CPU allocator setting: freed memory stays in the process, and users can opt out."""

import os
import subprocess
import sys
import textwrap

import pytest

from mlora import runtime

# Allocates, touches and frees 256 MB with malloc, and prints how much of it the process's
# resident memory kept (in MB) after the free.
PROBE = textwrap.dedent("""
    import ctypes, sys
    from mlora.runtime import tune_cpu_allocator
    applied = tune_cpu_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    size = 256 * 2**20
    before = rss_mb()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    print(applied, round(rss_mb() - before))
""")

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="glibc on Linux only")


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in (runtime.OPT_OUT_ENV, *runtime._ENV_SETTINGS)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied == "True", int(kept)


@glibc_linux
def test_freed_memory_stays_in_the_process():
    applied, kept = probe()
    assert applied
    assert kept >= 200  # the 256 MB block was not handed back to the kernel


@glibc_linux
@pytest.mark.parametrize("env", [{runtime.OPT_OUT_ENV: "1"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}])
def test_opting_out_or_own_malloc_settings_keep_the_system_default(env):
    applied, kept = probe(**env)
    assert not applied
    assert kept < 50  # glibc's default: a block this large is unmapped on free
