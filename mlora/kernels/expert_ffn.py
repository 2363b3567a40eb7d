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


def _spans(counts: list[int]):
    """``(expert, start, stop)`` of every non-empty expert group."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _shrink(x: torch.Tensor, A: torch.Tensor, counts: list[int], keep: float) -> torch.Tensor:
    """``x_e @ A_e^T / keep`` per expert group: ``(M, in) -> (M, r)``."""
    z = x.new_zeros(x.shape[0], A.shape[1])
    for e, a, b in _spans(counts):
        torch.mm(x[a:b], A[e].T, out=z[a:b])
    # The dropout rescale is applied to the rank-r result, not to the wide input.
    return z if keep == 1.0 else z.mul_(1.0 / keep)


def _expand_add_(buf: torch.Tensor, z: torch.Tensor, B: torch.Tensor, counts: list[int], alpha: float) -> torch.Tensor:
    """In place ``buf_e += alpha * z_e @ B_e^T`` per expert group (one fused GEMM each)."""
    for e, a, b in _spans(counts):
        buf[a:b].addmm_(z[a:b], B[e].T, alpha=alpha)
    return buf


def _times(z: torch.Tensor, W: torch.Tensor, counts: list[int], transpose: bool) -> torch.Tensor:
    """``z_e @ W_e^T`` (or ``z_e @ W_e``) per expert group into one new ``(M, k)`` tensor."""
    width = W.shape[1] if transpose else W.shape[2]
    out = z.new_zeros(z.shape[0], width)
    for e, a, b in _spans(counts):
        torch.mm(z[a:b], W[e].T if transpose else W[e], out=out[a:b])
    return out


def _outer(dy: torch.Tensor, x: torch.Tensor, counts: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per expert ``dy_e^T @ x_e`` stacked like `like` ``(E, out, in)``: the weight gradients."""
    grad = torch.zeros_like(like)
    for e, a, b in _spans(counts):
        torch.mm(dy[a:b].T, x[a:b], out=grad[e])
    return grad


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or wider when the inputs are (float64 in gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _mask(shape, p: float, like: torch.Tensor, generator) -> torch.Tensor | None:
    return lora_kernels.dropout_mask(shape, p, like.device, generator) if p > 0 else None


def _keep(mask: torch.Tensor | None, p: float) -> float:
    return 1.0 - p if mask is not None else 1.0


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, u, weight, token, counts, act_fn, projections, masks, *params):
        gate, up, down = projections
        acc = _acc(x)
        out = _ExpertFFN._pairs(x, g, u, token, counts, act_fn, gate, up, down, masks, acc)
        w = weight[:, None].to(acc)
        mixed = torch.zeros(x.shape[0], g.shape[1], dtype=acc, device=x.device)
        mixed.index_add_(0, token, out["a"] * w)
        extra = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
        if down is not None:
            # The routing weight and scaling ride on the rank-r factor, not the wide output.
            extra.index_add_(0, token, _times(out["zd"] * (w * down.scaling), down.B, counts, True))
        ctx.save_for_backward(x, g, u, weight, token, *[m for m in masks if m is not None])
        ctx.mask_present = [m is not None for m in masks]
        ctx.counts, ctx.act_fn, ctx.projections = counts, act_fn, projections
        return mixed, extra

    @staticmethod
    def _pairs(x, g, u, token, counts, act_fn, gate, up, down, masks, acc):
        """Per-pair tensors ``(M, ...)``; what forward computes and backward recomputes."""
        mask_x, mask_a = masks
        xs = x[token].to(acc)
        xm = xs * mask_x if mask_x is not None else xs
        out = {"xm": xm}
        for name, proj, base in (("g", gate, g), ("u", up, u)):
            value = base[token].to(acc)                  # a gathered copy: safe to add into
            if proj is not None:
                z = out["z" + name] = _shrink(xm, proj.A, counts, _keep(mask_x, proj.dropout))
                _expand_add_(value, z, proj.B, counts, proj.scaling)
            out[name] = value
        out["act_g"] = act_fn(out["g"])
        out["a"] = out["act_g"] * out["u"]
        if down is not None:
            out["am"] = out["a"] * mask_a if mask_a is not None else out["a"]
            out["zd"] = _shrink(out["am"], down.A, counts, _keep(mask_a, down.dropout))
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
        out = _ExpertFFN._pairs(x, g, u, token, counts, act_fn, gate, up, down, masks, acc)
        w = weight[:, None].to(acc)
        gm = grad_mixed[token].to(acc)                             # (M, I)
        grad_w = torch.linalg.vecdot(gm, out["a"])
        grad_a = gm.mul_(w)                                        # gm is a gathered copy
        grads = {}
        if down is not None:
            ge = grad_extra[token].to(acc)                         # (M, H)
            geB = _times(ge, down.B, counts, False)                # (M, r): ge_e @ B_e
            grad_w = grad_w + (geB * out["zd"]).sum(-1) * down.scaling
            grads["dB"] = _outer(ge, out["zd"] * (w * down.scaling), counts, down.B)
            d_zd = geB * (w * (down.scaling / _keep(masks[1], down.dropout)))
            grads["dA"] = _outer(d_zd, out["am"], counts, down.A)
            grad_am = _times(d_zd, down.A, counts, False)          # (M, I)
            grad_a += grad_am.mul_(masks[1]) if masks[1] is not None else grad_am
        grad_u = grad_a * out["act_g"]
        with torch.enable_grad():
            gs = out["g"].detach().requires_grad_(True)
            (grad_g,) = torch.autograd.grad(act_fn(gs), gs, grad_a.mul_(out["u"]))
        grad_xs = None
        for name, proj, grad in (("g", gate, grad_g), ("u", up, grad_u)):
            if proj is None:
                continue
            grads[name + "B"] = _outer(grad, out["z" + name] * proj.scaling, counts, proj.B)
            d_z = _times(grad, proj.B, counts, False).mul_(proj.scaling / _keep(masks[0], proj.dropout))
            grads[name + "A"] = _outer(d_z, out["xm"], counts, proj.A)
            grad_in = _times(d_z, proj.A, counts, False)           # (M, H)
            grad_xs = grad_in if grad_xs is None else grad_xs.add_(grad_in)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
        if grad_xs is not None:
            grad_x.index_add_(0, token, grad_xs.mul_(masks[0]) if masks[0] is not None else grad_xs)
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
