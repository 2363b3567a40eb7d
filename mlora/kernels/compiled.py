"""Fused CPU kernels from `torch.compile`, with the eager function as the fallback.

The wide elementwise work of the MixLoRA experts (activation, product, dropout, routing
weight and their gradients over ``(pairs, intermediate)`` tensors) is memory-bound on a CPU:
eager PyTorch makes one pass over memory per op. Compiled by inductor into a C++ loop it
makes one pass per function (figures in docs/benchmarks.md).

`call(fn, *args)` runs ``fn(*args)`` through a compiled copy of `fn` (one per `fn`, shapes
dynamic) and falls back to `fn` itself, for good, when compiling fails (no C++
compiler, an unsupported op): a warning says so once. ``MLORA_COMPILE=0`` skips compiling
altogether. The functions given must be pure (no in-place change of their inputs), so a
failed compiled call can be rerun eagerly. The first call in a process pays the compile
(seconds; less once inductor's on-disk cache holds the kernels).
"""

from __future__ import annotations

import os
import warnings

import torch

ENV = "MLORA_COMPILE"
_compiled: dict = {}
_failure: str | None = None


def enabled() -> bool:
    """True unless ``MLORA_COMPILE=0`` or an earlier compile failed in this process."""
    return os.environ.get(ENV, "1") != "0" and _failure is None


def call(fn, *args):
    """``fn(*args)``, compiled when `enabled` (see the module docstring)."""
    global _failure
    if enabled():
        try:
            compiled = _compiled.get(fn)
            if compiled is None:  # some torch and Python pairings refuse torch.compile right here
                compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            _failure = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            warnings.warn(f"torch.compile failed, so the fused CPU kernels run eagerly (slower): {_failure}. "
                          f"Set {ENV}=0 to skip the attempt.", RuntimeWarning, stacklevel=2)
    return fn(*args)
