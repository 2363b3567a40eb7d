"""The routed part of a MixLoRA FFN as one autograd function that recomputes in backward.

For one segment of N tokens routed to M (token, expert) pairs, given the frozen gate/up
outputs ``g, u (N, I)`` computed once for all experts, it returns

    mixed (N, I)  = sum_pairs w * act(g + s B_g A_g x) * (u + s B_u A_u x)
    extra (N, H)  = sum_pairs w * s B_d A_d a

(the frozen down is applied to `mixed` by the caller, once). Autograd through the plain
expression would keep about eight ``(M, I)`` tensors per layer alive until backward: with
top-2 routing that is several times the FFN activations of plain LoRA. This function keeps
only its inputs, the routing and the dropout masks (one byte per element), and recomputes
the per-pair tensors in backward, so MixLoRA's activation memory stays close to LoRA's.
The experts' LoRA runs as one GEMM pair per expert group (pairs are sorted by expert).

DoRA experts are not handled here (their per-expert norms make the recomputation heavier);
the caller uses plain autograd for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlora.kernels import lora as lora_kernels


@dataclass
class ExpertLoraWeights:
    """One projection's stacked expert LoRA: ``A (E, r, in)``, ``B (E, out, r)``, scaling, dropout."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float


def _grouped(x: torch.Tensor, W: torch.Tensor, counts: list[int], transpose: bool) -> torch.Tensor:
    """Rows of ``x (M, k)`` grouped by expert times ``W[e]^T`` (or ``W[e]`` if not transpose)."""
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n:
            w = W[e].T if transpose else W[e]
            pieces.append(x[start:start + n] @ w)
        start += n
    if not pieces:
        return x.new_zeros(x.shape[0], W.shape[1] if transpose else W.shape[2])
    return torch.cat(pieces)


def _grouped_outer(dy: torch.Tensor, x: torch.Tensor, counts: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per expert ``dy_e^T @ x_e`` stacked like `like` ``(E, out, in)``: the weight gradients."""
    grad = torch.zeros_like(like)
    start = 0
    for e, n in enumerate(counts):
        if n:
            grad[e] = dy[start:start + n].T @ x[start:start + n]
        start += n
    return grad


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or wider when the inputs are (float64 in gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _mask(shape, p: float, like: torch.Tensor, generator) -> torch.Tensor | None:
    return lora_kernels.dropout_mask(shape, p, like.device, generator) if p > 0 else None


def _apply_mask(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    return x if mask is None else x * mask * (1.0 / (1.0 - p))


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, u, weight, token, counts, act_fn, projections, masks, *params):
        gate, up, down = projections
        acc = _acc(x)
        xs = x[token].to(acc)
        out = _ExpertFFN._pairs(xs, g, u, token, counts, act_fn, gate, up, down, masks)
        a, zd = out["a"], out["zd"]
        w = weight[:, None]
        mixed = torch.zeros(x.shape[0], a.shape[1], dtype=acc, device=x.device)
        mixed.index_add_(0, token, w * a)
        extra = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
        if down is not None:
            extra.index_add_(0, token, w * (_grouped(zd, down.B, counts, True) * down.scaling))
        ctx.save_for_backward(x, g, u, weight, token, *[m for m in masks if m is not None])
        ctx.mask_present = [m is not None for m in masks]
        ctx.counts, ctx.act_fn, ctx.projections = counts, act_fn, projections
        return mixed, extra

    @staticmethod
    def _pairs(xs, g, u, token, counts, act_fn, gate, up, down, masks):
        """Per-pair tensors ``(M, ...)`` in fp32; what forward computes and backward recomputes."""
        mask_x, mask_a = masks
        out = {}
        gs, us = g[token].to(xs.dtype), u[token].to(xs.dtype)
        for name, proj, base in (("g", gate, gs), ("u", up, us)):
            if proj is None:
                out[name] = base
                continue
            z = _grouped(_apply_mask(xs, mask_x, proj.dropout), proj.A, counts, True)
            out["z" + name] = z
            out[name] = base + _grouped(z, proj.B, counts, True) * proj.scaling
        out["act_g"] = act_fn(out["g"])
        out["a"] = out["act_g"] * out["u"]
        out["zd"] = None
        if down is not None:
            out["da"] = _apply_mask(out["a"], mask_a, down.dropout)
            out["zd"] = _grouped(out["da"], down.A, counts, True)
        return out

    @staticmethod
    def backward(ctx, grad_mixed, grad_extra):
        x, g, u, weight, token, *saved_masks = ctx.saved_tensors
        acc = _acc(x)
        if grad_extra is None:
            grad_extra = torch.zeros(x.shape, dtype=acc, device=x.device)
        if grad_mixed is None:
            grad_mixed = torch.zeros(g.shape, dtype=acc, device=g.device)
        it = iter(saved_masks)
        masks = [next(it) if present else None for present in ctx.mask_present]
        counts, act_fn, (gate, up, down) = ctx.counts, ctx.act_fn, ctx.projections
        xs = x[token].to(acc)
        out = _ExpertFFN._pairs(xs, g, u, token, counts, act_fn, gate, up, down, masks)
        w = weight[:, None]
        gm = grad_mixed[token]                                     # (M, I)
        grad_w = (gm * out["a"]).sum(-1)
        grad_a = w * gm
        grads = {}
        if down is not None:
            ge = grad_extra[token]                                 # (M, H)
            lora_d = _grouped(out["zd"], down.B, counts, True) * down.scaling
            grad_w = grad_w + (ge * lora_d).sum(-1)
            d_lora = w * ge * down.scaling                         # d(loss)/d(B_d z_d)
            grads["dB"] = _grouped_outer(d_lora, out["zd"], counts, down.B)
            d_zd = _grouped(d_lora, down.B, counts, False)         # (M, r)
            grads["dA"] = _grouped_outer(d_zd, out["da"], counts, down.A)
            grad_a = grad_a + _apply_mask(_grouped(d_zd, down.A, counts, False), masks[1], down.dropout)
        grad_u = grad_a * out["act_g"]
        with torch.enable_grad():
            gs = out["g"].detach().requires_grad_(True)
            (grad_g,) = torch.autograd.grad(act_fn(gs), gs, grad_a * out["u"])
        grad_xs = torch.zeros_like(xs)
        for name, proj, grad in (("g", gate, grad_g), ("u", up, grad_u)):
            if proj is None:
                continue
            d_lora = grad * proj.scaling
            grads[name + "B"] = _grouped_outer(d_lora, out["z" + name], counts, proj.B)
            d_z = _grouped(d_lora, proj.B, counts, False)
            dropped_x = _apply_mask(xs, masks[0], proj.dropout)
            grads[name + "A"] = _grouped_outer(d_z, dropped_x, counts, proj.A)
            grad_xs = grad_xs + _apply_mask(_grouped(d_z, proj.A, counts, False), masks[0], proj.dropout)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(0, token, grad_xs)
        grad_gin = torch.zeros(g.shape, dtype=acc, device=g.device).index_add_(0, token, grad_g)
        grad_uin = torch.zeros(u.shape, dtype=acc, device=u.device).index_add_(0, token, grad_u)
        param_grads = []
        for name, proj in (("g", gate), ("u", up), ("", down)):
            if proj is not None:
                param_grads += [grads[name + "A"], grads[name + "B"]] if name else [grads["dA"], grads["dB"]]
        return (grad_x.to(x.dtype), grad_gin.to(g.dtype), grad_uin.to(u.dtype), grad_w.to(weight.dtype),
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
        training: dropout masks are drawn only in training, from `generator` (default: global RNG).
    Returns:
        ``mixed (N, I)`` fp32 and ``extra (N, H)`` fp32 (see the module docstring).
    """
    m = token.shape[0]
    p_x = max([p.dropout for p in (gate, up) if p is not None], default=0.0)
    masks = (
        _mask((m, x.shape[1]), p_x, x, generator) if training else None,
        _mask((m, g.shape[1]), down.dropout, x, generator) if training and down is not None else None,
    )
    params = [t for p in (gate, up, down) if p is not None for t in (p.A, p.B)]
    return _ExpertFFN.apply(x, g, u, weight, token, counts, act_fn, (gate, up, down), masks, *params)
