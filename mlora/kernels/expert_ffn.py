"""The routed part of a MixLoRA FFN as one autograd function with a hand-written backward.

For one segment of N tokens routed to M (token, expert) pairs, given the frozen gate/up
outputs ``g, u (N, I)`` computed once for all experts, it returns

    mixed (N, I)  = sum_pairs w * act(g + s B_g A_g x) * (u + s B_u A_u x)
    extra (N, H)  = sum_pairs w * s B_d A_d a

(the frozen down is applied to `mixed` by the caller, once). Autograd through the plain
expression would keep about eight ``(M, I)`` tensors per layer alive until backward. This
function keeps two, the pairs' adapted gate and up outputs, plus their rows of x ``(M, H)``,
the rank-r factors and one-byte dropout masks (gate, up and down each draw their own), and
recomputes the masked inputs, the activation and the product in backward:
MixLoRA's peak memory stays near 1.1x LoRA's, and backward makes few passes over the wide
per-pair tensors, which is what its time is made of on a CPU. The wide elementwise work of
each direction is one pure function (`_forward_wide`, `_backward_wide`); on CPU, for SiLU
experts, `torch.compile` fuses each into one loop (`mlora.kernels.compiled`, eager when
compiling is off or fails). The experts' LoRA runs as one GEMM pair per expert group (pairs
are sorted by expert).

DoRA experts are not handled here (their per-expert norms make the backward heavier); the
caller uses plain autograd for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlora.kernels import compiled
from mlora.kernels import lora as lora_kernels


@dataclass
class ExpertLoraWeights:
    """One projection's stacked expert LoRA: ``A (E, r, in)``, ``B (E, out, r)``, scaling, dropout."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float


def _spans(counts: list[int]):
    """``(expert, start, stop)`` of every non-empty expert group."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _narrow(x: torch.Tensor, W: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x_e @ W_e^T`` per expert group for a wide ``x (M, K)`` and ``W (E, k, K)`` with small k.

    Computed as ``W_e @ x_e^T`` into a ``(k, M)`` buffer and returned as its ``(M, k)``
    transpose: with the wide operand on the right, CPU BLAS runs these skinny products
    faster (docs/benchmarks.md).
    """
    out_t = x.new_zeros(W.shape[1], x.shape[0])
    for e, a, b in _spans(counts):
        out_t[:, a:b] = torch.mm(W[e], x[a:b].T)
    return out_t.T


def _shrink(x: torch.Tensor, A: torch.Tensor, counts: list[int], keep: float) -> torch.Tensor:
    """``x_e @ A_e^T / keep`` per expert group: ``(M, in) -> (M, r)``."""
    z = _narrow(x, A, counts)
    # The dropout rescale is applied to the rank-r result, not to the wide input.
    return z if keep == 1.0 else z.mul_(1.0 / keep)


def _expand_add_(buf: torch.Tensor, z: torch.Tensor, B: torch.Tensor, counts: list[int], alpha: float) -> torch.Tensor:
    """In place ``buf_e += alpha * z_e @ B_e^T`` per expert group (one fused GEMM each)."""
    for e, a, b in _spans(counts):
        buf[a:b].addmm_(z[a:b], B[e].T, alpha=alpha)
    return buf


def _times(z: torch.Tensor, W: torch.Tensor, counts: list[int], transpose: bool) -> torch.Tensor:
    """``z_e @ W_e^T`` (or ``z_e @ W_e``) per expert group into one new ``(M, k)`` tensor."""
    if not transpose and W.shape[2] < W.shape[1]:
        return _narrow(z, W.transpose(1, 2), counts)              # a wide z down to rank r
    width = W.shape[1] if transpose else W.shape[2]
    out = z.new_zeros(z.shape[0], width)
    for e, a, b in _spans(counts):
        torch.mm(z[a:b], W[e].T if transpose else W[e], out=out[a:b])
    return out


def _outer(dy: torch.Tensor, x: torch.Tensor, counts: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per expert ``dy_e^T @ x_e`` stacked like `like` ``(E, out, in)``: the weight gradients."""
    grad = torch.zeros_like(like)
    for e, a, b in _spans(counts):
        if dy.shape[1] > x.shape[1]:
            grad[e] = torch.mm(x[a:b].T, dy[a:b]).T               # the wide operand on the right
        else:
            torch.mm(dy[a:b].T, x[a:b], out=grad[e])
    return grad


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or wider when the inputs are (float64 in gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _keep(mask: torch.Tensor | None, p: float) -> float:
    return 1.0 - p if mask is not None else 1.0


def _rows(t: torch.Tensor, token: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A fresh ``(M, ...)`` copy of the rows `token` of `t` (safe to change in place)."""
    rows = torch.index_select(t, 0, token)
    return rows if rows.dtype == acc else rows.to(acc)


def _scatter(rows: torch.Tensor, token: torch.Tensor, n: int) -> torch.Tensor:
    """Sum ``rows (M, k)`` into an ``(n, k)`` tensor by token."""
    return rows.new_zeros(n, rows.shape[1]).index_add_(0, token, rows)


def _is_silu(act_fn) -> bool:
    """F.silu, torch's SiLU module, or transformers' ``SiLUActivation`` (its "silu")."""
    return act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _act_backward(act_fn, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``grad * act'(pre)``: SiLU in one fused kernel, other activations through autograd."""
    if _is_silu(act_fn):
        return torch.ops.aten.silu_backward(grad, pre)
    with torch.enable_grad():
        leaf = pre.detach().requires_grad_(True)
        (out,) = torch.autograd.grad(act_fn(leaf), leaf, grad)
    return out


def _masked(xr: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """``xr (M, H)`` as one projection's LoRA input sees it: a copy with its dropped positions
    zeroed, or `xr` itself without a mask."""
    return xr if drop is None else xr.masked_fill(drop, 0.0)


def _in_factors(xr: torch.Tensor, inputs: list, drops: list, counts: list[int]) -> list[torch.Tensor]:
    """The rank-r factors of the gate/up LoRA, ``[(M, r_p)]`` in the order of `inputs`.

    ``xr (M, H)`` holds the pairs' rows of x. Without dropout masks, both projections share one
    GEMM per expert over it; with them, each shrinks its own masked copy, dropped right after.
    Each factor is scaled by 1 / its keep probability (on the narrow result, not the wide input).
    """
    if all(drop is None for drop in drops):
        A_in = torch.cat([p.A for p in inputs], dim=1) if len(inputs) > 1 else inputs[0].A
        return _split(_shrink(xr, A_in, counts, 1.0), inputs)
    return [_shrink(_masked(xr, drop), proj.A, counts, _keep(drop, proj.dropout)) for proj, drop in zip(inputs, drops)]


def _split(z_in: torch.Tensor, inputs: list) -> list[torch.Tensor]:
    """The ``(M, r_p)`` column blocks of ``z_in (M, sum r_p)``, one per projection of `inputs`."""
    out, col = [], 0
    for proj in inputs:
        out.append(z_in[:, col:col + proj.A.shape[1]])
        col += proj.A.shape[1]
    return out


def _in_backward(xr: torch.Tensor, inputs: list, drops: list, d_zs: list, counts: list[int]):
    """Backward of `_in_factors`: ``([grad A_p (E, r_p, H)], grad of the pairs' rows of x (M, H))``.

    `d_zs[i]` is the gradient of input i's factor, the keep rescale already applied. Masked
    inputs are made again from `xr`, one at a time (keeping one unmasked copy for backward
    instead of one masked copy per projection).
    """
    if all(drop is None for drop in drops):
        d_z = torch.cat(d_zs, dim=1) if len(d_zs) > 1 else d_zs[0]
        A_in = torch.cat([p.A for p in inputs], dim=1) if len(inputs) > 1 else inputs[0].A
        grad_A_in = _outer(d_z, xr, counts, A_in)                      # (E, r_g + r_u, H)
        return _split_experts(grad_A_in, inputs), _times(d_z, A_in, counts, False)
    grad_As, grad_xr = [], None
    for proj, drop, d_z in zip(inputs, drops, d_zs):
        grad_As.append(_outer(d_z, _masked(xr, drop), counts, proj.A))
        part = _times(d_z, proj.A, counts, False)                       # (M, H)
        if drop is not None:
            part.masked_fill_(drop, 0.0)
        grad_xr = part if grad_xr is None else grad_xr.add_(part)
    return grad_As, grad_xr


def _split_experts(grad_A_in: torch.Tensor, inputs: list) -> list[torch.Tensor]:
    """The ``(E, r_p, H)`` blocks of a stacked ``(E, sum r_p, H)`` gradient."""
    out, row = [], 0
    for proj in inputs:
        out.append(grad_A_in[:, row:row + proj.A.shape[1]])
        row += proj.A.shape[1]
    return out


def _forward_wide(g_p, u_p, drop, w, with_am: bool, act_fn):
    """The wide per-pair work of forward, pure: ``(w * a, am)`` with ``a = act(g_p) * u_p``
    and ``am`` the dropped-out ``a`` (the down LoRA's input; None unless `with_am`)."""
    a = act_fn(g_p) * u_p
    am = (a.masked_fill(drop, 0.0) if drop is not None else a) if with_am else None
    return a * w, am


def _backward_wide(g_p, u_p, gm, grad_am, drop, w, with_am: bool, act_fn):
    """The wide per-pair work of backward, pure.

    Args: ``gm (M, I)`` the gradient of ``mixed`` at each pair's token; ``grad_am (M, I)``
    the gradient of the down LoRA's input, or None when down is not targeted.
    Returns: ``(grad_w (M,), am or None, grad_g (M, I), grad_u (M, I))``.
    """
    act = act_fn(g_p)
    a = act * u_p
    grad_w = torch.linalg.vecdot(gm, a)
    am = (a.masked_fill(drop, 0.0) if drop is not None else a) if with_am else None
    if grad_am is None:
        grad_a = gm * w
    else:
        grad_a = torch.addcmul(grad_am.masked_fill(drop, 0.0) if drop is not None else grad_am, gm, w)
    return grad_w, am, _act_backward(act_fn, grad_a * u_p, g_p), grad_a * act


_SILU_FORMS = {fn: functools.partial(fn, act_fn=F.silu) for fn in (_forward_wide, _backward_wide)}


def _wide(fn, act_fn, *args):
    """``fn(*args, act_fn=act_fn)``: fused by `torch.compile` on CPU for SiLU experts, eager otherwise."""
    if args[0].device.type == "cpu" and _is_silu(act_fn):
        # SiLU fixed inside; dynamo specialises on dtype and on which inputs are None.
        return compiled.call(_SILU_FORMS[fn], *args)
    return fn(*args, act_fn=act_fn)


class _ExpertFFN(torch.autograd.Function):
    """Saves the pairs' adapted gate/up outputs, their rows of x, the one-byte dropout masks and
    the rank-r factors; recomputes the masked inputs, the activation and the product in backward."""

    @staticmethod
    def forward(ctx, x, g, u, weight, token, counts, act_fn, projections, drops, *params):
        gate, up, down = projections
        drop_g, drop_u, drop_a = drops
        acc = _acc(x)
        inputs = [(p, d) for p, d in ((gate, drop_g), (up, drop_u)) if p is not None]
        xr = _rows(x, token, acc) if inputs else None               # (M, H), kept for backward
        zs = _in_factors(xr, [p for p, _ in inputs], [d for _, d in inputs], counts) if inputs else []
        factor = {id(p): z for (p, _), z in zip(inputs, zs)}
        adapted = []
        for proj, base in ((gate, g), (up, u)):
            value = _rows(base, token, acc)                          # (M, I), a fresh copy
            if proj is not None:
                _expand_add_(value, factor[id(proj)], proj.B, counts, proj.scaling)
            adapted.append(value)
        g_p, u_p = adapted
        w = weight[:, None].to(acc)
        aw, am = _wide(_forward_wide, act_fn, g_p, u_p, drop_a, w, down is not None)
        mixed = _scatter(aw, token, x.shape[0])
        del aw
        extra = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
        zd = None
        if down is not None:
            zd = _shrink(am, down.A, counts, _keep(drop_a, down.dropout))
            del am
            # The routing weight and scaling ride on the rank-r factor, not the wide output.
            extra.index_add_(0, token, _times(zd * (w * down.scaling), down.B, counts, True))
        z_g, z_u = factor.get(id(gate)), factor.get(id(up))
        ctx.save_for_backward(x, weight, token, g_p, u_p, xr, z_g, z_u, zd, drop_g, drop_u, drop_a)
        ctx.counts, ctx.act_fn, ctx.projections = counts, act_fn, projections
        ctx.base_dtype = g.dtype                                     # of g and u, the frozen outputs
        return mixed, extra

    @staticmethod
    def backward(ctx, grad_mixed, grad_extra):
        x, weight, token, g_p, u_p, xr, z_g, z_u, zd, drop_g, drop_u, drop_a = ctx.saved_tensors
        counts, act_fn, (gate, up, down) = ctx.counts, ctx.act_fn, ctx.projections
        acc = _acc(x)
        w = weight[:, None].to(acc)
        grads = {}
        gm = (_rows(grad_mixed, token, acc) if grad_mixed is not None
              else torch.zeros(g_p.shape, dtype=acc, device=x.device))               # (M, I)
        grad_am = d_zd = None
        grad_w_down = 0.0
        if down is not None:
            ge = (_rows(grad_extra, token, acc) if grad_extra is not None
                  else torch.zeros(token.shape[0], x.shape[1], dtype=acc, device=x.device))
            geB = _times(ge, down.B, counts, False)                   # (M, r): ge_e @ B_e
            grad_w_down = (geB * zd).sum(-1) * down.scaling
            grads["dB"] = _outer(ge, zd * (w * down.scaling), counts, down.B)
            d_zd = geB.mul_(w * (down.scaling / _keep(drop_a, down.dropout)))
            grad_am = _times(d_zd, down.A, counts, False)             # (M, I), through the down LoRA
        grad_w, am, grad_g, grad_u = _wide(_backward_wide, act_fn, g_p, u_p, gm, grad_am, drop_a, w,
                                           down is not None)
        del gm, grad_am
        grad_w = grad_w + grad_w_down
        if down is not None:
            grads["dA"] = _outer(d_zd, am, counts, down.A)
            del am
        inputs = [(name, p, gr, z, d) for name, p, gr, z, d in (("g", gate, grad_g, z_g, drop_g),
                                                                 ("u", up, grad_u, z_u, drop_u)) if p is not None]
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
        if inputs:
            d_zs = []
            for name, proj, grad, z, drop in inputs:
                grads[name + "B"] = _outer(grad, z * proj.scaling, counts, proj.B)
                d_zs.append(_times(grad, proj.B, counts, False).mul_(proj.scaling / _keep(drop, proj.dropout)))
            grad_As, grad_xs = _in_backward(xr, [i[1] for i in inputs], [i[4] for i in inputs], d_zs, counts)
            grad_x.index_add_(0, token, grad_xs)
            for (name, *_), grad_A in zip(inputs, grad_As):
                grads[name + "A"] = grad_A
        grad_gin = _scatter(grad_g, token, x.shape[0])
        grad_uin = _scatter(grad_u, token, x.shape[0])
        param_grads = []
        for name, proj in (("g", gate), ("u", up), ("d", down)):
            if proj is not None:
                param_grads += [grads[name + "A"], grads[name + "B"]]
        return (grad_x.to(x.dtype), grad_gin.to(ctx.base_dtype), grad_uin.to(ctx.base_dtype), grad_w.to(weight.dtype),
                None, None, None, None, None, *param_grads)


def expert_ffn(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, token: torch.Tensor,
               weight: torch.Tensor, counts: list[int], act_fn,
               gate: ExpertLoraWeights | None, up: ExpertLoraWeights | None,
               down: ExpertLoraWeights | None, training: bool,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed expert LoRA of one segment, memory-lean.

    Args:
        x: ``(N, H)`` FFN input; g, u: ``(N, I)`` frozen gate/up outputs.
        token: ``(M,)`` token of each pair, pairs sorted by expert; counts: pairs per expert.
        weight: ``(M,)`` fp32 routing weight of each pair (differentiable: the router learns).
        act_fn: the experts' activation; gate/up/down: the projections' expert LoRA or None.
        training: dropout masks are drawn only in training, from `generator` (default: global RNG),
            over the pairs in order. The caller routes no padding (`mlora.model.router.route`),
            so the pairs, and with them each real token's masks, do not depend on the batch's
            padded width.
    Returns:
        ``mixed (N, I)`` fp32 and ``extra (N, H)`` fp32 (see the module docstring).
    """
    keeps = dropout_masks(token, x, g, gate, up, down, training, generator)
    # Dropped positions, for in-place masked fills (one byte per element, kept for backward).
    drops = tuple(k.logical_not_() if k is not None else None for k in keeps)
    params = [t for p in (gate, up, down) if p is not None for t in (p.A, p.B)]
    return _ExpertFFN.apply(x, g, u, weight, token, counts, act_fn, (gate, up, down), drops, *params)


def dropout_masks(token: torch.Tensor, x: torch.Tensor, g: torch.Tensor, gate: ExpertLoraWeights | None,
                  up: ExpertLoraWeights | None, down: ExpertLoraWeights | None, training: bool,
                  generator: torch.Generator | None):
    """The keep-masks of the routed pairs' expert LoRA inputs: ``(gate (M, H), up (M, H), down (M, I))``.

    Each targeted projection with dropout draws its own mask, as each LoRA layer of the official
    `mixlora` package does, from `generator` (None: the global RNG) in this order, gate, up,
    down, over the M pairs in their (expert-sorted) order; None where it draws none (not
    training, not targeted, or no dropout). The Triton path and MixDoRA's experts draw the same.
    """
    m = token.shape[0]
    shapes = ((gate, x.shape[1]), (up, x.shape[1]), (down, g.shape[1]))
    return tuple(lora_kernels.dropout_mask((m, width), proj.dropout, x.device, generator)
                 if training and proj is not None and proj.dropout > 0 else None for proj, width in shapes)
