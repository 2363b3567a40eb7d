"""The chunked per-token cross-entropy against torch's own `F.cross_entropy`."""

import pytest
import torch
import torch.nn.functional as F

from mlora.kernels import cross_entropy
from mlora.kernels.cross_entropy import token_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_torch_cross_entropy(dtype, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 3 * 50)  # several chunks, the last one short
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(11, 50, generator=gen)).to(dtype)
    labels = torch.randint(0, 50, (11,), generator=gen)
    labels[[2, 7]] = -100
    weights = torch.randn(11, generator=gen)

    ours_in = logits.clone().requires_grad_(True)
    ours = token_cross_entropy(ours_in, labels)
    (ours * weights).sum().backward()
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in.float(), labels, ignore_index=-100, reduction="none")
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(ours[[2, 7]] == 0) and torch.all(ours_in.grad[[2, 7]] == 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours_in.grad, ref_in.grad.to(dtype), atol=tol, rtol=tol)


def test_float64_gradient_is_exact_by_finite_differences():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, -100, 0, 6])
    assert torch.autograd.gradcheck(lambda x: token_cross_entropy(x, labels), (logits,))
