"""The memory-lean expert FFN function: forward against a plain expression, gradients by finite differences."""

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from mlora.kernels.expert_ffn import ExpertLoraWeights, expert_ffn
from mlora.kernels.lora import dropout_mask


def problem(dtype=torch.float64, dropout=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, H, I, E, r = 5, 6, 7, 3, 2
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, g, u = rnd(N, H), rnd(N, I), rnd(N, I)
    # Pairs sorted by expert; expert 1 gets none.
    token = torch.tensor([0, 2, 3, 4, 1, 2, 0])
    counts = [4, 0, 3]
    weight = torch.rand(7, generator=gen, dtype=dtype)
    proj = {
        "gate": ExpertLoraWeights(rnd(E, r, H), rnd(E, I, r), 0.5, dropout),
        "up": ExpertLoraWeights(rnd(E, r, H), rnd(E, I, r), 0.5, dropout),
        "down": ExpertLoraWeights(rnd(E, r, I), rnd(E, H, r), 0.5, dropout),
    }
    return x, g, u, token, weight, counts, proj


def plain(x, g, u, token, weight, counts, proj, act=F.silu, masks=None):
    """The same math as one autograd expression, pair by pair; `masks`: the keep-masks of the
    gate, up and down LoRA inputs, ``{name: (M, width) bool}`` (None: no dropout)."""
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    mixed = torch.zeros(x.shape[0], g.shape[1], dtype=x.dtype)
    extra = torch.zeros_like(x)

    def lora(name, i, e, v):
        p = proj[name]
        if masks is not None:
            v = v * masks[name][i] / (1.0 - p.dropout)
        return p.scaling * p.B[e] @ (p.A[e] @ v)

    for i in range(token.shape[0]):
        t, e, w = token[i], experts[i], weight[i]
        a = act(g[t] + lora("gate", i, e, x[t])) * (u[t] + lora("up", i, e, x[t]))
        mixed = mixed.index_add(0, t[None], (w * a)[None])
        extra = extra.index_add(0, t[None], (w * lora("down", i, e, a))[None])
    return mixed, extra


@pytest.mark.parametrize("act", [F.silu, ACT2FN["silu"], F.gelu], ids=["F.silu", "transformers-silu", "gelu"])
def test_forward_and_gradients_match_a_plain_expression(act):
    x, g, u, token, weight, counts, proj = problem()
    leaves = [x, g, u, weight] + [t for p in proj.values() for t in (p.A, p.B)]
    for t in leaves:
        t.requires_grad_(True)
    mixed, extra = expert_ffn(x, g, u, token, weight, counts, act, proj["gate"], proj["up"], proj["down"], True)
    ref_m, ref_e = plain(x, g, u, token, weight, counts, proj, act)
    torch.testing.assert_close(mixed, ref_m)
    torch.testing.assert_close(extra, ref_e)
    gm, ge = torch.randn_like(mixed), torch.randn_like(extra)
    ours = torch.autograd.grad((mixed * gm).sum() + (extra * ge).sum(), leaves)
    theirs = torch.autograd.grad((ref_m * gm).sum() + (ref_e * ge).sum(), leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("up",), ("gate", "down")])
def test_gradients_are_exact_by_finite_differences(dropout, targets):
    x, g, u, token, weight, counts, proj = problem(dropout=dropout)
    chosen = {k: (v if k in targets else None) for k, v in proj.items()}
    params = [t for p in chosen.values() if p is not None for t in (p.A, p.B)]

    def fn(x, g, u, weight, *params):
        it = iter(params)
        rebuilt = {k: (ExpertLoraWeights(next(it), next(it), v.scaling, v.dropout) if v is not None else None)
                   for k, v in chosen.items()}
        # A fixed seed: every evaluation draws the same dropout masks.
        torch.manual_seed(0)
        return expert_ffn(x, g, u, token, weight, counts, F.silu, rebuilt["gate"], rebuilt["up"],
                          rebuilt["down"], True)

    inputs = [t.requires_grad_(True) for t in (x, g, u, weight, *params)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_gate_up_and_down_each_draw_their_own_mask():
    """As each LoRA layer of the official mixlora package: one mask per projection, drawn from
    the stream in the order gate, up, down over the pairs."""
    x, g, u, token, weight, counts, proj = problem(dropout=0.5)
    mixed, extra = expert_ffn(x, g, u, token, weight, counts, F.silu, proj["gate"], proj["up"], proj["down"], True,
                              torch.Generator().manual_seed(3))
    stream = torch.Generator().manual_seed(3)
    m = token.shape[0]
    masks = {name: dropout_mask((m, width), 0.5, "cpu", stream)
             for name, width in (("gate", x.shape[1]), ("up", x.shape[1]), ("down", g.shape[1]))}
    assert not torch.equal(masks["gate"], masks["up"])
    ref_m, ref_e = plain(x, g, u, token, weight, counts, proj, masks=masks)
    torch.testing.assert_close(mixed, ref_m)
    torch.testing.assert_close(extra, ref_e)
