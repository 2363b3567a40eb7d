"""The kernel backend: Triton on CUDA, the torch path everywhere else.

`segmented_lora_add` and `expert_ffn` here take the same arguments as their torch versions
in `mlora.kernels.lora` and `mlora.kernels.expert_ffn` and return the same values and
gradients. They use `mlora.kernels.triton_lora` when `use_triton` says so: the input is
on a CUDA device, Triton imports, and ``MLORA_DISABLE_TRITON`` is unset (set it to any
non-empty value to compare against, or fall back to, the torch path). float64 inputs
(gradient checks) always take the torch path: the kernels accumulate in fp32.
"""

from __future__ import annotations

import functools
import os

import torch

from mlora.kernels import expert_ffn as torch_expert_ffn
from mlora.kernels import lora as torch_lora

DISABLE_ENV = "MLORA_DISABLE_TRITON"


@functools.cache
def triton_available() -> bool:
    """True when Triton (and so `mlora.kernels.triton_lora`) imports."""
    try:
        import mlora.kernels.triton_lora  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """True when `tensor` is on CUDA, Triton imports and ``MLORA_DISABLE_TRITON`` is unset."""
    return tensor.is_cuda and not os.environ.get(DISABLE_ENV) and triton_available()


def _triton_for(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and use_triton(x)


def expert_ffn(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, token: torch.Tensor,
               weight: torch.Tensor, counts: list[int], act_fn,
               gate: torch_expert_ffn.ExpertLoraWeights | None, up: torch_expert_ffn.ExpertLoraWeights | None,
               down: torch_expert_ffn.ExpertLoraWeights | None, training: bool,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed expert LoRA of one segment: ``mixed (N, I)``, ``extra (N, H)`` fp32.

    See `mlora.kernels.expert_ffn.expert_ffn` for the arguments; Triton on CUDA, torch otherwise.
    """
    if _triton_for(x):
        from mlora.kernels import triton_lora
        return triton_lora.expert_ffn(x, g, u, token, weight, counts, act_fn, gate, up, down, training, generator)
    return torch_expert_ffn.expert_ffn(x, g, u, token, weight, counts, act_fn, gate, up, down, training,
                                       generator)


def segmented_lora_add(base: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                       As: list[torch.Tensor], Bs: list[torch.Tensor], scalings: list[float], dropouts: list[float],
                       training: bool, generators: list[torch.Generator | None] | None = None,
                       real: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``base (N, out)`` plus the adapters' deltas over their row segments of ``x (N, in)``.

    See `mlora.kernels.lora.segmented_lora_add` (in place on the torch path; `real`: each
    segment's real rows, the only ones its masks are drawn for); on CUDA with Triton,
    ``base + delta`` from the Triton kernels, with the same masks.
    """
    if _triton_for(x):
        from mlora.kernels import triton_lora
        delta = triton_lora.segmented_lora_delta(x, segments, As, Bs, scalings, dropouts, training, generators, real)
        return base + delta.to(base.dtype)
    return torch_lora.segmented_lora_add(base, x, segments, As, Bs, scalings, dropouts, training, generators, real)
