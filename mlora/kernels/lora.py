"""Many adapters' LoRA deltas ``s * B A dropout(x)`` over their row segments, as one autograd function.

Plain autograd would keep a dropped-out fp32 copy of every adapted projection's input per
adapter until backward (4 bytes per element, plus the fp32 cast of a bf16 input) and give
every segment its own full-size input gradient. `segmented_lora_add` adds all plain-LoRA
segments of a projection in place into the frozen layer's output, keeps the input as it came
(usually alive anyway), one-byte dropout masks and the rank-r intermediates, and re-applies
the masks in backward. The masks (`dropout_mask`, `token_dropout_mask`) are drawn here for
the Triton path too, so both paths use the same ones.
"""

from __future__ import annotations

import math

import torch


def dropout_mask(shape, p: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool keep-mask with keep probability ``1 - p`` (rounded to a multiple of 2^-16).

    Each element compares 16 random bits with a threshold; the bits come from 64-bit draws,
    four elements a draw: cheaper than ``rand < keep`` (one 32-bit draw and a float per
    element) or ``bernoulli_`` (docs/benchmarks.md). The rounding moves the keep probability
    by at most 7.7e-6.
    """
    threshold = round((1.0 - p) * 65536) - 32768
    if not -32768 < threshold < 32768:                                 # keeps all / none (int16 range)
        return torch.full(shape, threshold > 0, dtype=torch.bool, device=device)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)                 # every bit uniform
    lanes = words.view(torch.int16)[:n].view(shape)                    # uniform on [-2^15, 2^15)
    return lanes < threshold


def token_dropout_mask(rows: int, width: int, p: float, device, generator: torch.Generator | None = None,
                       real: torch.Tensor | None = None) -> torch.Tensor:
    """A ``(rows, width)`` bool keep-mask drawn for the rows `real` only.

    Args:
        rows, width: the mask's shape (tokens, features); p: the drop probability.
        real: ``(n,)`` long ascending row indices (a segment's real tokens), or None for all
            rows. The draw is `dropout_mask` over ``(n, width)``, put at those rows; the
            other rows (padding) are dropped. A real token's mask thus depends on the real
            tokens before it, not on how much padding the batch puts around them.
    """
    if real is None:
        # Through the module attribute: tests hand `dropout_mask` a known mask.
        return dropout_mask((rows, width), p, device, generator).reshape(rows, width)
    drawn = dropout_mask((real.shape[0], width), p, device, generator).reshape(real.shape[0], width)
    # index_put_ rather than index_copy_: much faster for bool rows on CPU (docs/benchmarks.md).
    return torch.zeros(rows, width, dtype=torch.bool, device=device).index_put_((real,), drawn)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class _SegmentedLora(torch.autograd.Function):
    """Several adapters' LoRA deltas added in place into their row segments of ``base (N, out)``.

    Adding into the frozen layer's output saves a zero-filled delta buffer and a full extra
    pass; one input-gradient buffer serves all segments (slicing the input per adapter under
    autograd would give every segment its own full-size zero-filled gradient).
    """

    @staticmethod
    def forward(ctx, base, x, segments, factors, masks, *params):
        n = len(params) // 2
        As, Bs = params[:n], params[n:]
        acc = _acc(x)
        zs = []
        for (start, end, i), factor, mask in zip(segments, factors, masks):
            h = x[start:end].to(acc)
            if mask is not None:
                h = h * mask
            z = (h @ As[i].T).mul_(factor)                # (rows, r), scaling / keep folded in
            if base.dtype == acc:
                base[start:end].addmm_(z, Bs[i].T)
            else:                                         # e.g. a bf16 base: one rounding, in the add
                base[start:end] += z @ Bs[i].T
            zs.append(z)
        ctx.mark_dirty(base)
        ctx.save_for_backward(x, *[m for m in masks if m is not None], *zs)
        ctx.segments, ctx.factors, ctx.has_mask, ctx.n = segments, factors, [m is not None for m in masks], n
        ctx.params = params
        return base

    @staticmethod
    def backward(ctx, grad):
        x, *rest = ctx.saved_tensors
        n_masks = sum(ctx.has_mask)
        it_masks, zs = iter(rest[:n_masks]), rest[n_masks:]
        As, Bs = ctx.params[:ctx.n], ctx.params[ctx.n:]
        acc = _acc(x)
        grad_x = None
        if ctx.needs_input_grad[1]:
            # Every segment's rows are written below; only the rows between segments need zeros.
            grad_x = torch.empty(x.shape, dtype=acc, device=x.device)
            position = 0
            for start, end, _ in sorted(ctx.segments):
                grad_x[position:start] = 0
                position = end
            grad_x[position:] = 0
        grad_A = [torch.zeros_like(A) for A in As]
        grad_B = [torch.zeros_like(B) for B in Bs]
        for (start, end, i), factor, has, z in zip(ctx.segments, ctx.factors, ctx.has_mask, zs):
            mask = next(it_masks) if has else None
            g = grad[start:end].to(acc)
            grad_B[i] += (z.T @ g).T                      # faster than g.T @ z in CPU BLAS (docs/benchmarks.md)
            dz = (g @ Bs[i]).mul_(factor)                 # (rows, r)
            h = x[start:end].to(acc)
            if mask is not None:
                h = h * mask
            grad_A[i] += dz.T @ h
            if grad_x is not None:
                gx = torch.mm(dz, As[i], out=grad_x[start:end])
                if mask is not None:
                    gx.mul_(mask)
        return (grad, grad_x.to(x.dtype) if grad_x is not None else None, None, None, None, *grad_A, *grad_B)


def segment_masks(x: torch.Tensor, segments: list[tuple[int, int, int]], dropouts: list[float], training: bool,
                  generators: list[torch.Generator | None] | None,
                  real: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
    """Each segment's ``(end - start, in)`` keep-mask for ``x (N, in)``, or None without dropout.

    Segment j's mask comes from its adapter's generator (None: the global RNG), drawn over
    ``real[j]`` (its real rows, offsets from ``start``; None: all rows) with
    `token_dropout_mask`, segment by segment in order. The torch and Triton paths both draw
    here, so one seed gives one set of masks.
    """
    masks = []
    for j, (start, end, i) in enumerate(segments):
        p = dropouts[i] if training else 0.0
        if p > 0:
            gen = generators[i] if generators is not None else None
            rows = real[j] if real is not None else None
            masks.append(token_dropout_mask(end - start, x.shape[1], p, x.device, gen, rows))
        else:
            masks.append(None)
    return masks


def segmented_lora_add(base: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                       As: list[torch.Tensor], Bs: list[torch.Tensor], scalings: list[float], dropouts: list[float],
                       training: bool, generators: list[torch.Generator | None] | None = None,
                       real: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``base`` plus many adapters' ``s_i B_i A_i dropout_i(x)`` over their row segments, in place.

    Args:
        base: ``(N, out)`` the frozen layer's output for `x` (not a view; changed in place and
            returned, with autograd aware of the change).
        x: ``(N, in)``; segments: ``(start, end, adapter)`` disjoint row ranges, adapter an
            index into the lists; As[i]: ``(r_i, in)``; Bs[i]: ``(out, r_i)`` (ranks may differ).
        generators: adapter i's dropout masks come from ``generators[i]`` (None: the global
            RNG), drawn segment by segment in order (see `segment_masks`).
        real: per segment, ``(n_j,)`` long offsets (from its start) of its real rows, or None
            (all real). With dropout, masks are drawn over the real rows only and the other
            rows are dropped whole (no delta). With all None: each segment's mask is
            ``dropout_mask((end - start, in))`` from its adapter's stream.
    Returns:
        `base`, its rows in the segments increased by the deltas (computed in fp32 or wider).
    """
    masks = segment_masks(x, segments, dropouts, training, generators, real)
    factors = [scalings[i] / (1.0 - dropouts[i] if m is not None else 1.0) for (_, _, i), m in zip(segments, masks)]
    return _SegmentedLora.apply(base, x, segments, factors, masks, *As, *Bs)


def segmented_lora_delta(x: torch.Tensor, segments: list[tuple[int, int, int]], As: list[torch.Tensor],
                         Bs: list[torch.Tensor], scalings: list[float], dropouts: list[float], training: bool,
                         generators: list[torch.Generator | None] | None = None,
                         real: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """The deltas alone: `segmented_lora_add` onto zeros, ``(N, out)`` fp32 (or wider).

    Rows outside every segment are zero.
    """
    base = torch.zeros(x.shape[0], Bs[0].shape[0], dtype=_acc(x), device=x.device)
    return segmented_lora_add(base, x, segments, As, Bs, scalings, dropouts, training, generators, real)
