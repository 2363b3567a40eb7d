"""Triton kernels for grouped LoRA: many adapters (or experts) over row groups, one launch each.

Segmented multi-adapter LoRA and MixLoRA's expert LoRA are the same computation seen from
two sides: rows ``p`` of an operand fall into groups ``[start, end)`` and every group uses
its own weight slot (an adapter, or an expert). Segments are groups of batch rows; expert
groups are the (token, expert) pairs sorted by expert, whose input rows are *gathered*
from the tokens (``x[token[p]]``) and whose outputs are *scattered* back, weighted by the
routing weight (``out[token[p]] += w[p] * ...``, with atomics). Three kernels cover every
product, forward and backward:

    shrink  z[p, r]       = [s_g] sum_k  X(p, k) W_g[k, r]      (narrow output: rank r)
    expand  y[dst(p), n] += [w_p s_g m_pn/keep_g] sum_r z[p, r] W_g[r, n]
    outer   G_g[i, j]     = [s_g] sum_{p in g} L(p, i) R(p, j)  (weight gradients)

with ``X(p, k) = x[src(p), k] [* m_pk / keep_g]`` (optional gather and dropout mask). The
weights of all slots are stacked ``(S, ., .)``; adapters of different ranks are zero-padded
to the largest (padded rows and columns stay zero and get zero gradients). Every product
accumulates in fp32 with IEEE fp32 dot products (no TF32), the torch path's contract, and
returns fp32; float64 stays on the torch path (see `mlora.kernels.backend`).

`grouped_shrink` and `grouped_expand` are the two autograd functions; `segmented_lora_delta`
and `expert_ffn` build the two uses from them. This module imports Triton: import it only
when `mlora.kernels.backend.triton_available()` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from mlora.kernels import lora as lora_kernels
from mlora.kernels.expert_ffn import ExpertLoraWeights, dropout_masks

BLOCK_M = 32   # rows per tile (and per step of the weight-gradient reduction)
BLOCK_K = 64   # reduction step over the wide dimension in shrink
BLOCK_N = 64   # output columns per program in expand, and the tile of weight gradients


def _rank_block(r: int) -> int:
    # tl.dot needs every dimension >= 16 on GPUs; ranks above 64 loop over 64-wide chunks.
    return min(64, max(16, triton.next_power_of_2(r)))


# --------------------------------------------------------------------------- kernels


@triton.jit
def _shrink_kernel(x_ptr, src_ptr, mask_ptr, w_ptr, out_ptr,
                   tile_group_ptr, tile_row_ptr, end_ptr, slot_ptr, scale_ptr, inv_keep_ptr,
                   K, R,
                   sx_row, sx_k, sm_row, sm_k, sw_slot, sw_k, sw_r, so_row, so_r,
                   GATHER: tl.constexpr, MASKED: tl.constexpr, SCALED: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BM)
    live = rows < tl.load(end_ptr + group)
    slot = tl.load(slot_ptr + group).to(tl.int64)
    src = rows.to(tl.int64)
    if GATHER:
        src = tl.load(src_ptr + rows, mask=live, other=0).to(tl.int64)
    rs = tl.program_id(1) * BR + tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        inside = live[:, None] & (ks < K)[None, :]
        xt = tl.load(x_ptr + src[:, None] * sx_row + ks[None, :] * sx_k, mask=inside, other=0.0).to(tl.float32)
        if MASKED:
            kept = tl.load(mask_ptr + rows[:, None].to(tl.int64) * sm_row + ks[None, :] * sm_k, mask=inside, other=0)
            xt = tl.where(kept != 0, xt * tl.load(inv_keep_ptr + group), 0.0)
        wt = tl.load(w_ptr + slot * sw_slot + ks[:, None] * sw_k + rs[None, :] * sw_r,
                     mask=(ks < K)[:, None] & (rs < R)[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(xt, wt, input_precision="ieee")
    if SCALED:
        acc = acc * tl.load(scale_ptr + group)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * so_row + rs[None, :] * so_r, acc,
             mask=live[:, None] & (rs < R)[None, :])


@triton.jit
def _expand_kernel(z_ptr, w_ptr, row_scale_ptr, dst_ptr, mask_ptr, out_ptr,
                   tile_group_ptr, tile_row_ptr, end_ptr, slot_ptr, scale_ptr, inv_keep_ptr,
                   N, R,
                   sz_row, sz_r, sw_slot, sw_r, sw_n, sm_row, sm_n, so_row, so_n,
                   SCATTER: tl.constexpr, ROW_SCALED: tl.constexpr, MASKED: tl.constexpr,
                   SCALED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BM)
    live = rows < tl.load(end_ptr + group)
    slot = tl.load(slot_ptr + group).to(tl.int64)
    ns = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rs = r0 + tl.arange(0, BR)
        zt = tl.load(z_ptr + rows[:, None].to(tl.int64) * sz_row + rs[None, :] * sz_r,
                     mask=live[:, None] & (rs < R)[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + slot * sw_slot + rs[:, None] * sw_r + ns[None, :] * sw_n,
                     mask=(rs < R)[:, None] & (ns < N)[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(zt, wt, input_precision="ieee")
    if SCALED:
        acc = acc * tl.load(scale_ptr + group)
    if ROW_SCALED:
        acc = acc * tl.load(row_scale_ptr + rows, mask=live, other=0.0).to(tl.float32)[:, None]
    inside = live[:, None] & (ns < N)[None, :]
    if MASKED:
        kept = tl.load(mask_ptr + rows[:, None].to(tl.int64) * sm_row + ns[None, :] * sm_n, mask=inside, other=0)
        acc = tl.where(kept != 0, acc * tl.load(inv_keep_ptr + group), 0.0)
    if SCATTER:
        dst = tl.load(dst_ptr + rows, mask=live, other=0).to(tl.int64)
        tl.atomic_add(out_ptr + dst[:, None] * so_row + ns[None, :] * so_n, acc, mask=inside)
    else:
        tl.store(out_ptr + rows[:, None].to(tl.int64) * so_row + ns[None, :] * so_n, acc, mask=inside)


@triton.jit
def _outer_kernel(l_ptr, l_src_ptr, row_scale_ptr, r_ptr, r_src_ptr, mask_ptr, out_ptr,
                  start_ptr, end_ptr, scale_ptr, inv_keep_ptr,
                  P, Q,
                  sl_row, sl_i, sr_row, sr_j, sm_row, sm_j, so_group, so_i, so_j,
                  L_GATHER: tl.constexpr, ROW_SCALED: tl.constexpr, R_GATHER: tl.constexpr,
                  MASKED: tl.constexpr, SCALED: tl.constexpr,
                  BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    group = tl.program_id(0)
    i = tl.program_id(1) * BP + tl.arange(0, BP)
    j = tl.program_id(2) * BQ + tl.arange(0, BQ)
    start = tl.load(start_ptr + group)
    end = tl.load(end_ptr + group)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        live = rows < end
        l_rows = rows.to(tl.int64)
        if L_GATHER:
            l_rows = tl.load(l_src_ptr + rows, mask=live, other=0).to(tl.int64)
        r_rows = rows.to(tl.int64)
        if R_GATHER:
            r_rows = tl.load(r_src_ptr + rows, mask=live, other=0).to(tl.int64)
        # L loaded transposed, (BP, BM), so the reduction over rows is one dot.
        lt = tl.load(l_ptr + l_rows[None, :] * sl_row + i[:, None] * sl_i,
                     mask=live[None, :] & (i < P)[:, None], other=0.0).to(tl.float32)
        if ROW_SCALED:
            lt = lt * tl.load(row_scale_ptr + rows, mask=live, other=0.0).to(tl.float32)[None, :]
        inside = live[:, None] & (j < Q)[None, :]
        rt = tl.load(r_ptr + r_rows[:, None] * sr_row + j[None, :] * sr_j, mask=inside, other=0.0).to(tl.float32)
        if MASKED:
            kept = tl.load(mask_ptr + rows[:, None].to(tl.int64) * sm_row + j[None, :] * sm_j, mask=inside, other=0)
            rt = tl.where(kept != 0, rt * tl.load(inv_keep_ptr + group), 0.0)
        acc += tl.dot(lt, rt, input_precision="ieee")
    if SCALED:
        acc = acc * tl.load(scale_ptr + group)
    tl.store(out_ptr + group.to(tl.int64) * so_group + i[:, None] * so_i + j[None, :] * so_j, acc,
             mask=(i < P)[:, None] & (j < Q)[None, :])


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Groups:
    """Row groups of an ``(M, ...)`` operand and the launch tiles over them, on the device.

    Group ``g`` covers rows ``[start[g], end[g])`` and uses weight slot ``slot[g]`` with
    scaling ``scale[g]`` and dropout keep-factor ``inv_keep[g] = 1 / (1 - p)``. Empty groups
    are left out (nothing to launch; their slots' gradients stay zero). Tile ``t`` is rows
    ``tile_row[t] + [0, BLOCK_M)`` of group ``tile_group[t]``.
    """

    start: torch.Tensor
    end: torch.Tensor
    slot: torch.Tensor
    scale: torch.Tensor
    inv_keep: torch.Tensor
    tile_group: torch.Tensor
    tile_row: torch.Tensor

    @staticmethod
    def build(bounds: list[tuple[int, int]], slots: list[int], scales: list[float], inv_keeps: list[float],
              device) -> Groups:
        kept = [g for g, (a, b) in enumerate(bounds) if b > a]
        tiles = [(n, row) for n, g in enumerate(kept) for row in range(bounds[g][0], bounds[g][1], BLOCK_M)]
        ints = ([bounds[g][0] for g in kept] + [bounds[g][1] for g in kept] + [slots[g] for g in kept]
                + [n for n, _ in tiles] + [row for _, row in tiles])
        # Two host-to-device copies for the whole table, whatever the number of groups.
        ints = torch.tensor(ints, dtype=torch.int32).to(device, non_blocking=True)
        floats = torch.tensor([scales[g] for g in kept] + [inv_keeps[g] for g in kept],
                              dtype=torch.float32).to(device, non_blocking=True)
        G, T = len(kept), len(tiles)
        return Groups(ints[:G], ints[G:2 * G], ints[2 * G:3 * G], floats[:G], floats[G:],
                      ints[3 * G:3 * G + T], ints[3 * G + T:])

    @property
    def num_groups(self) -> int:
        return self.start.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tile_group.shape[0]

    def with_factors(self, scale: float, inv_keep: float) -> Groups:
        """The same groups with one scaling and keep-factor for all (the experts of one projection)."""
        return replace(self, scale=torch.full_like(self.scale, scale), inv_keep=torch.full_like(self.inv_keep, inv_keep))


def _mask_u8(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.view(torch.uint8)


def _launch_shrink(x, src, mask, W, sw, groups: Groups, m_rows: int, R: int, scaled: bool) -> torch.Tensor:
    """``out (m_rows, R)`` fp32, ``out[p] = [s_g] X(p) @ W_g`` with ``W_g[k, r]`` at strides ``sw = (slot, k, r)``."""
    out = torch.zeros(m_rows, R, dtype=torch.float32, device=x.device)
    if groups.num_tiles == 0 or R == 0:
        return out
    mask = _mask_u8(mask)
    BR = _rank_block(R)
    grid = (groups.num_tiles, triton.cdiv(R, BR))
    _shrink_kernel[grid](
        x, src if src is not None else x, mask if mask is not None else x, W, out,
        groups.tile_group, groups.tile_row, groups.end, groups.slot, groups.scale, groups.inv_keep,
        x.shape[1], R,
        x.stride(0), x.stride(1), *(mask.stride() if mask is not None else (0, 0)), *sw, *out.stride(),
        GATHER=src is not None, MASKED=mask is not None, SCALED=scaled, BM=BLOCK_M, BK=BLOCK_K, BR=BR)
    return out


def _launch_expand(z, W, sw, N: int, groups: Groups, out: torch.Tensor, dst=None, row_scale=None, mask=None,
                   scaled: bool = True) -> torch.Tensor:
    """Adds ``[w_p s_g m/keep] z[p] @ W_g`` to ``out[dst(p)]`` (``W_g[r, n]`` at strides ``sw = (slot, r, n)``)."""
    if groups.num_tiles == 0 or N == 0:
        return out
    mask = _mask_u8(mask)
    R = z.shape[1]
    grid = (groups.num_tiles, triton.cdiv(N, BLOCK_N))
    _expand_kernel[grid](
        z, W, row_scale if row_scale is not None else z, dst if dst is not None else z,
        mask if mask is not None else z, out,
        groups.tile_group, groups.tile_row, groups.end, groups.slot, groups.scale, groups.inv_keep,
        N, R,
        z.stride(0), z.stride(1), *sw, *(mask.stride() if mask is not None else (0, 0)), *out.stride(),
        SCATTER=dst is not None, ROW_SCALED=row_scale is not None, MASKED=mask is not None, SCALED=scaled,
        BM=BLOCK_M, BN=BLOCK_N, BR=_rank_block(R))
    return out


def _launch_outer(left, left_src, row_scale, right, right_src, mask, groups: Groups, num_slots: int,
                  scaled: bool) -> torch.Tensor:
    """Weight gradient ``(num_slots, P, Q)``: per group ``sum_p L(p)^T R(p)``, summed over groups by slot."""
    P, Q = left.shape[1], right.shape[1]
    grad = torch.zeros(num_slots, P, Q, dtype=torch.float32, device=left.device)
    if groups.num_groups == 0 or P == 0 or Q == 0:
        return grad
    per_group = torch.empty(groups.num_groups, P, Q, dtype=torch.float32, device=left.device)
    mask = _mask_u8(mask)
    grid = (groups.num_groups, triton.cdiv(P, BLOCK_N), triton.cdiv(Q, BLOCK_N))
    _outer_kernel[grid](
        left, left_src if left_src is not None else left, row_scale if row_scale is not None else left,
        right, right_src if right_src is not None else right, mask if mask is not None else right, per_group,
        groups.start, groups.end, groups.scale, groups.inv_keep,
        P, Q,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        *(mask.stride() if mask is not None else (0, 0)), *per_group.stride(),
        L_GATHER=left_src is not None, ROW_SCALED=row_scale is not None, R_GATHER=right_src is not None,
        MASKED=mask is not None, SCALED=scaled, BM=BLOCK_M, BP=BLOCK_N, BQ=BLOCK_N)
    # Several segments may share an adapter: their partial gradients add up.
    return grad.index_add_(0, groups.slot.long(), per_group)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# --------------------------------------------------------------------------- autograd functions


class _GroupedShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, groups, src, mask, m_rows):
        z = _launch_shrink(x, src, mask, A, (A.stride(0), A.stride(2), A.stride(1)), groups, m_rows, A.shape[1],
                           scaled=False)
        ctx.save_for_backward(x, A, src, mask)
        ctx.groups = groups
        return z

    @staticmethod
    def backward(ctx, dz):
        x, A, src, mask = ctx.saved_tensors
        groups = ctx.groups
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            # grad_x[src(p)] += (dz[p] @ A_g) * m_p / keep_g: an expand whose output scatters to the sources.
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            _launch_expand(dz, A, (A.stride(0), A.stride(1), A.stride(2)), x.shape[1], groups, out,
                           dst=src, mask=mask, scaled=False)
            grad_x = out.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_A = _launch_outer(dz, None, None, x, src, mask, groups, A.shape[0], scaled=False).to(A.dtype)
        return grad_x, grad_A, None, None, None, None


class _GroupedExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, B, weight, groups, dst, n_out):
        out = torch.zeros(n_out, B.shape[1], dtype=torch.float32, device=z.device)
        _launch_expand(z, B, (B.stride(0), B.stride(2), B.stride(1)), B.shape[1], groups, out,
                       dst=dst, row_scale=weight)
        ctx.save_for_backward(z, B, weight, dst)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad):
        z, B, weight, dst = ctx.saved_tensors
        groups = ctx.groups
        grad_z = grad_B = grad_w = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            # s_g * grad[dst(p)] @ B_g, before the routing weight: also what grad_w needs, since
            # d out / d w_p = s_g z_p B_g^T gives grad_w[p] = <z_p, s_g grad[dst(p)] @ B_g>.
            dz = _launch_shrink(grad, dst, None, B, (B.stride(0), B.stride(1), B.stride(2)), groups, z.shape[0],
                                B.shape[2], scaled=True)
            if ctx.needs_input_grad[2]:
                grad_w = (dz * z.float()).sum(-1).to(weight.dtype)
            if weight is not None:
                dz = dz * weight[:, None].float()
            grad_z = dz.to(z.dtype)
        if ctx.needs_input_grad[1]:
            grad_B = _launch_outer(grad, dst, weight, z, None, None, groups, B.shape[0], scaled=True).to(B.dtype)
        return grad_z, grad_B, grad_w, None, None, None


def grouped_shrink(x: torch.Tensor, A: torch.Tensor, groups: Groups, src: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, m_rows: int | None = None) -> torch.Tensor:
    """``z[p] = dropout_g(x[src[p]]) @ A[slot_g]^T`` for the rows p of each group, fp32.

    Args:
        x: ``(rows, in)``; A: ``(S, r, in)`` stacked weights; src: ``(M,)`` int gather index
            (None: ``src[p] = p``); mask: ``(M, in)`` bool keep-mask or None, kept values
            scaled by the group's ``inv_keep``; m_rows: M (default: the rows of x).
    Returns:
        ``z (M, r)`` fp32; rows in no group are zero.
    """
    m_rows = (src.shape[0] if src is not None else x.shape[0]) if m_rows is None else m_rows
    if x.dim() != 2 or A.dim() != 3 or (mask is not None and mask.shape != (m_rows, x.shape[1])):
        raise ValueError(f"grouped_shrink takes x (rows, in), A (S, r, in), mask (M, in); got x {tuple(x.shape)}, "
                         f"A {tuple(A.shape)}, mask {None if mask is None else tuple(mask.shape)} with M = {m_rows}")
    src = src.contiguous() if src is not None else None
    mask = mask.contiguous() if mask is not None else None
    return _GroupedShrink.apply(x, A, groups, src, mask, m_rows)


def grouped_expand(z: torch.Tensor, B: torch.Tensor, groups: Groups, dst: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None, n_out: int | None = None) -> torch.Tensor:
    """``out[dst[p]] += weight[p] * s_g * z[p] @ B[slot_g]^T``, fp32, atomics where dst repeats.

    Args:
        z: ``(M, r)``; B: ``(S, out, r)`` stacked weights; dst: ``(M,)`` int scatter index
            (None: row p of the output); weight: ``(M,)`` per-row factor or None;
            n_out: rows of the output (default M).
    Returns:
        ``(n_out, out)`` fp32; rows that nothing lands on are zero.
    """
    n_out = z.shape[0] if n_out is None else n_out
    dst = dst.contiguous() if dst is not None else None
    weight = weight.contiguous() if weight is not None else None
    return _GroupedExpand.apply(z, B, weight, groups, dst, n_out)


# --------------------------------------------------------------------------- the two uses


def _stack_padded(weights: list[torch.Tensor], rank_dim: int) -> torch.Tensor:
    """Stack ``(r_i, in)`` (rank_dim 0) or ``(out, r_i)`` (rank_dim 1) weights, zero-padded to the max rank.

    Differentiable torch ops: each adapter's gradient is the slice of the stacked one.
    """
    r = max(w.shape[rank_dim] for w in weights)
    pads = [(0, 0, 0, r - w.shape[0]) if rank_dim == 0 else (0, r - w.shape[1]) for w in weights]
    return torch.stack([F.pad(w, p) if any(p) else w for w, p in zip(weights, pads)])


def segmented_lora_delta(x: torch.Tensor, segments: list[tuple[int, int, int]], As: list[torch.Tensor],
                         Bs: list[torch.Tensor], scalings: list[float], dropouts: list[float], training: bool,
                         generators: list[torch.Generator | None] | None = None,
                         real: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Many adapters' ``s_i B_i A_i dropout_i(x)`` over their row segments, one launch per product.

    Args:
        x: ``(N, in)``; segments: ``(start, end, adapter)`` row ranges, disjoint, adapter an
            index into the lists; As[i]: ``(r_i, in)``; Bs[i]: ``(out, r_i)`` (ranks may differ).
        generators, real: as in `mlora.kernels.lora.segmented_lora_add`; the masks are drawn
            by the same `mlora.kernels.lora.segment_masks`, so both paths use the same ones.
    Returns:
        ``(N, out)`` fp32 delta; rows outside every segment are zero.
    """
    x2 = _rows2d(x)
    keep = [1.0 - p if training and p > 0 else 1.0 for p in dropouts]
    mask = None
    if any(keep[a] < 1.0 and end > start for start, end, a in segments):
        mask = torch.ones(x2.shape, dtype=torch.bool, device=x.device)
        drawn = lora_kernels.segment_masks(x2, segments, dropouts, training, generators, real)
        for (start, end, _), m in zip(segments, drawn):
            if m is not None:
                mask[start:end] = m
    groups = Groups.build([(s, e) for s, e, _ in segments], [a for _, _, a in segments],
                          [scalings[a] for _, _, a in segments], [1.0 / keep[a] for _, _, a in segments], x.device)
    A = _stack_padded(list(As), 0)
    B = _stack_padded(list(Bs), 1)
    z = grouped_shrink(x2, A, groups, mask=mask)
    return grouped_expand(z, B, groups).reshape(*x.shape[:-1], B.shape[1])


def _routed(x, g, u, weight, token, groups, act_fn, gate, up, down, masks, n):
    """The expert FFN's routed part (see `mlora.kernels.expert_ffn`) from the grouped kernels."""
    mask_g, mask_u, mask_a = masks
    acc = torch.promote_types(x.dtype, torch.float32)
    branches = []
    for proj, base, mask in ((gate, g, mask_g), (up, u, mask_u)):
        h = base[token].to(acc)
        if proj is not None:
            pg = groups.with_factors(proj.scaling, 1.0 / (1.0 - proj.dropout))
            z = grouped_shrink(x, proj.A, pg, src=token, mask=mask)
            h = h + grouped_expand(z, proj.B, pg)
        branches.append(h)
    a = act_fn(branches[0]) * branches[1]                               # (M, I)
    mixed = torch.zeros(n, a.shape[1], dtype=acc, device=x.device).index_add(0, token, weight[:, None] * a)
    if down is None:
        return mixed, torch.zeros(n, x.shape[1], dtype=acc, device=x.device)
    dg = groups.with_factors(down.scaling, 1.0 / (1.0 - down.dropout))
    zd = grouped_shrink(a, down.A, dg, mask=mask_a)
    return mixed, grouped_expand(zd, down.B, dg, dst=token, weight=weight, n_out=n)


def expert_ffn(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, token: torch.Tensor,
               weight: torch.Tensor, counts: list[int], act_fn,
               gate: ExpertLoraWeights | None, up: ExpertLoraWeights | None,
               down: ExpertLoraWeights | None, training: bool,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`mlora.kernels.expert_ffn.expert_ffn` on Triton: same arguments, values and gradients.

    The expert LoRA products run as grouped kernels (gather by token fused into the shrink,
    routing-weighted scatter-add into the expand); activation and the weighted sum into
    ``mixed`` stay torch ops. Memory stays lean the same way as the torch path: the routed
    part runs under activation checkpointing, so backward keeps only the inputs and the
    dropout masks (drawn here, before, so the recomputation sees the same ones) and
    recomputes the per-pair tensors.
    """
    # The torch path's draws, in its order: one seed gives one set of masks.
    masks = dropout_masks(token, x, g, gate, up, down, training, generator)
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    groups = Groups.build(bounds, list(range(len(counts))), [1.0] * len(counts), [1.0] * len(counts), x.device)
    token = token.contiguous()

    def routed(x, g, u, weight):
        return _routed(x, g, u, weight, token, groups, act_fn, gate, up, down, masks, x.shape[0])

    if not torch.is_grad_enabled():
        return routed(x, g, u, weight)
    # No random draws inside: the RNG state need not be stashed for the recomputation.
    return checkpoint(routed, x, g, u, weight, use_reentrant=False, preserve_rng_state=False)
