"""The torch.compile wrapper: compiled and eager agree; a failing compiler falls back to eager once, with a warning."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from mlora.kernels import compiled
from mlora.kernels.expert_ffn import ExpertLoraWeights, expert_ffn


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, H, I, E, r = 9, 8, 12, 4, 3
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    token = torch.tensor([0, 3, 5, 8, 1, 2, 3, 4, 6, 7, 0, 8])
    counts = [5, 3, 0, 4]
    weight = torch.rand(12, generator=gen)
    proj = [ExpertLoraWeights(rnd(E, r, H), rnd(E, I, r), 0.5, 0.3), ExpertLoraWeights(rnd(E, r, H), rnd(E, I, r), 0.5, 0.3),
            ExpertLoraWeights(rnd(E, r, I), rnd(E, H, r), 0.5, 0.3)]
    return rnd(N, H), rnd(N, I), rnd(N, I), token, weight, counts, proj


def run(seed=0):
    x, g, u, token, weight, counts, proj = problem(seed)
    leaves = [x, g, u, weight] + [t for p in proj for t in (p.A, p.B)]
    for t in leaves:
        t.requires_grad_(True)
    mixed, extra = expert_ffn(x, g, u, token, weight, counts, F.silu, *proj, True, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(9)
    gm, ge = torch.randn(mixed.shape, generator=gen), torch.randn(extra.shape, generator=gen)
    grads = torch.autograd.grad((mixed * gm).sum() + (extra * ge).sum(), leaves)
    return [mixed, extra, *grads]


def test_compiled_and_eager_experts_agree(monkeypatch):
    fused = run()
    assert compiled.enabled()  # the fused path ran, compiled
    assert {fn.func.__name__ for fn in compiled._compiled} >= {"_forward_wide", "_backward_wide"}
    monkeypatch.setenv(compiled.ENV, "0")
    eager = run()
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_compile_refused_outright_also_falls_back(monkeypatch):
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failure", None)

    def refused(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refused)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="not supported on this Python"):
        assert torch.equal(compiled.call(torch.neg, x), -x)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failure", None)

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found\ndetails")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert torch.equal(compiled.call(torch.neg, x), -x)
    assert not compiled.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on, without a second warning
        assert torch.equal(compiled.call(torch.neg, x), -x)
