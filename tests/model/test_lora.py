"""LoRA and DoRA math of one wrapped projection against independent dense computations."""

import math

import pytest
import torch
from torch import nn

from mlora.model.context import AdapterContext, BatchLayout
from mlora.model.lora import LoraLinear


def wrapped(in_f=12, out_f=10, bias=False, **kwargs):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias)
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    ctx = AdapterContext()
    layer = LoraLinear(base, ctx)
    settings = dict(r=4, lora_alpha=8.0, lora_dropout=0.0, use_rslora=False, use_dora=False, lora_init="original")
    settings.update(kwargs)
    adapter = layer.add("a", **settings)
    nn.init.normal_(adapter.lora_B.weight, std=0.5)
    ctx.default_adapter = "a"
    return layer, adapter


def test_fresh_adapter_is_the_identity():
    base = nn.Linear(12, 10)
    layer = LoraLinear(base, AdapterContext())
    layer.add("a", r=4, lora_alpha=8.0)
    layer.context.default_adapter = "a"
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_dense_reparametrisation(rslora):
    layer, ad = wrapped(bias=True, use_rslora=rslora)
    s = 8.0 / (math.sqrt(4) if rslora else 4)
    x = torch.randn(3, 5, 12)
    y = layer(x)
    A = ad.lora_A.weight.detach().clone().requires_grad_(True)
    B = ad.lora_B.weight.detach().clone().requires_grad_(True)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    ref = x @ (W + s * B @ A).T + b
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(ad.lora_A.weight.grad, A.grad)
    torch.testing.assert_close(ad.lora_B.weight.grad, B.grad)
    assert layer.base_layer.weight.grad is None


def test_dropout_gradients_are_exact_for_the_same_mask(monkeypatch):
    layer, ad = wrapped(lora_dropout=0.3)
    layer.train()
    x = torch.randn(4, 6, 12)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.7
    # The layer draws its mask through this seam; hand it a known one.
    monkeypatch.setattr("mlora.kernels.lora.dropout_mask", lambda shape, p, device, generator=None: mask)
    y = layer(x)
    A = ad.lora_A.weight.detach().clone().requires_grad_(True)
    B = ad.lora_B.weight.detach().clone().requires_grad_(True)
    W = layer.base_layer.weight
    ref = x @ W.T + 2.0 * (x * mask / 0.7) @ A.T @ B.T
    torch.testing.assert_close(y, ref)
    (y.square().sum()).backward()
    (ref.square().sum()).backward()
    # fp32 sums in another order: compare at a few ulps of gradients in the tens.
    torch.testing.assert_close(ad.lora_A.weight.grad, A.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ad.lora_B.weight.grad, B.grad, rtol=1e-5, atol=1e-4)


def test_dropout_is_off_in_eval():
    layer, _ = wrapped(lora_dropout=0.5)
    layer.eval()
    x = torch.randn(2, 3, 12)
    assert torch.equal(layer(x), layer(x))


def test_dora_matches_dense_formula_with_trained_magnitude():
    layer, ad = wrapped(bias=True, use_dora=True)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    # The magnitude starts as the row norms of W and is a trained parameter.
    torch.testing.assert_close(ad.magnitude.detach(), W.norm(dim=1))
    assert ad.magnitude.requires_grad
    with torch.no_grad():
        ad.magnitude.mul_(torch.linspace(0.5, 1.5, 10))
    x = torch.randn(3, 5, 12)
    y = layer(x)
    m = ad.magnitude.detach().clone().requires_grad_(True)
    A = ad.lora_A.weight.detach().clone().requires_grad_(True)
    B = ad.lora_B.weight.detach().clone().requires_grad_(True)
    V = W + 2.0 * B @ A
    ref = (x @ V.T) * (m / V.norm(dim=1).detach()) + b
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for ours, theirs in [(ad.magnitude, m), (ad.lora_A.weight, A), (ad.lora_B.weight, B)]:
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_gaussian_init_and_fp32_math_on_bf16_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    layer = LoraLinear(base, AdapterContext())
    ad = layer.add("a", r=8, lora_alpha=16.0, lora_init="gaussian")
    assert ad.lora_A.weight.dtype == torch.float32
    assert abs(ad.lora_A.weight.std().item() - 1 / 8) < 0.03
    nn.init.normal_(ad.lora_B.weight, std=0.5)
    layer.context.default_adapter = "a"
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = base(x).float() + 2.0 * (x.float() @ ad.lora_A.weight.T @ ad.lora_B.weight.T)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_segments_get_their_own_adapter_and_gaps_keep_the_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    ctx = AdapterContext()
    layer = LoraLinear(base, ctx)
    for name, r in [("a", 2), ("b", 4)]:
        nn.init.normal_(layer.add(name, r=r, lora_alpha=4.0).lora_B.weight)
    x = torch.randn(6, 3, 12)
    with ctx.scope(BatchLayout.from_sizes([("a", 2), ("other", 1), ("b", 3)])):
        y = layer(x)
    for name, rows in [("a", slice(0, 2)), ("b", slice(3, 6))]:
        ad = layer.adapters[name]
        ref = x[rows] @ (base.weight + ad.scaling * ad.lora_B.weight @ ad.lora_A.weight).T
        torch.testing.assert_close(y[rows], ref)
    assert torch.equal(y[2:3], base(x[2:3]))
