"""The segmented LoRA delta function: values against the plain expression, gradients by finite
differences; the dropout masks."""

import pytest
import torch

from mlora.kernels.lora import dropout_mask, segmented_lora_delta
from tests.kernels.plain import plain_lora_delta


def test_matches_the_plain_expression_without_dropout():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 6, generator=gen, requires_grad=True)
    A = torch.randn(2, 6, generator=gen, requires_grad=True)
    B = torch.randn(5, 2, generator=gen, requires_grad=True)
    ours = segmented_lora_delta(x, [(0, 6, 0)], [A], [B], [1.5], [0.0], training=True)
    ref = 1.5 * x @ A.T @ B.T
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad((ours * g).sum(), (x, A, B)),
                               torch.autograd.grad((ref * g).sum(), (x, A, B)))


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.05, 0.5, 0.9, 1.0])
def test_dropout_masks_drop_at_the_rate_asked_in_every_lane(p):
    n = 400_000
    mask = dropout_mask((n // 8, 8), p, "cpu", torch.Generator().manual_seed(3))
    assert mask.shape == (n // 8, 8) and mask.dtype == torch.bool
    # Each of the four 16-bit lanes of a 64-bit draw (columns j and j + 4) on its own.
    for lane in range(4):
        cols = mask[:, [lane, lane + 4]]
        dropped = 1.0 - cols.float().mean().item()
        sigma = (p * (1 - p) / cols.numel()) ** 0.5
        assert abs(dropped - p) <= 5 * sigma + 2**-16, (lane, dropped)


def test_dropout_masks_follow_their_generator():
    a = dropout_mask((7, 13), 0.3, "cpu", torch.Generator().manual_seed(5))
    b = dropout_mask((7, 13), 0.3, "cpu", torch.Generator().manual_seed(5))
    c = dropout_mask((7, 13), 0.3, "cpu", torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_scales_kept_inputs_and_is_off_in_eval():
    x = torch.ones(4000, 1)
    A, B = torch.ones(1, 1), torch.ones(1, 1)
    out = segmented_lora_delta(x, [(0, 4000, 0)], [A], [B], [1.0], [0.25], training=True)
    kept = out != 0
    assert torch.allclose(out[kept], torch.tensor(1 / 0.75))
    assert 0.7 < kept.float().mean().item() < 0.8
    assert torch.equal(segmented_lora_delta(x, [(0, 4000, 0)], [A], [B], [1.0], [0.25], training=False), x)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_are_exact_by_finite_differences(dropout):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    As = [torch.randn(r, 6, generator=gen, dtype=torch.float64, requires_grad=True) for r in (2, 3)]
    Bs = [torch.randn(5, r, generator=gen, dtype=torch.float64, requires_grad=True) for r in (2, 3)]

    def fn(x, A0, A1, B0, B1):
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        return segmented_lora_delta(x, [(0, 3, 1), (4, 7, 0)], [A0, A1], [B0, B1], [0.7, 1.3], [dropout, dropout],
                                    training=True)

    assert torch.autograd.gradcheck(fn, (x, *As, *Bs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_segmented_deltas_equal_the_plain_expression_per_segment(dropout):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 6, generator=gen, requires_grad=True)
    As = [torch.randn(r, 6, generator=gen, requires_grad=True) for r in (2, 3)]
    Bs = [torch.randn(5, r, generator=gen, requires_grad=True) for r in (2, 3)]
    segments = [(0, 3, 1), (3, 3, 0), (4, 7, 0), (7, 10, 1)]   # an empty segment, row 3 uncovered
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    ours = segmented_lora_delta(x, segments, As, Bs, [0.5, 2.0], [dropout, dropout], True, gens)
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    ref = torch.zeros(10, 5)
    for start, end, i in segments:
        if end > start:
            ref = ref.index_add(0, torch.arange(start, end),
                                plain_lora_delta(x[start:end], As[i], Bs[i], [0.5, 2.0][i], dropout, True, gens[i]))
    torch.testing.assert_close(ours, ref)
    assert torch.equal(ours[3], torch.zeros(5))
    g = torch.randn_like(ref)
    leaves = [x, *As, *Bs]
    for a, b in zip(torch.autograd.grad((ours * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.3, 0.6])
def test_masks_over_real_rows_equal_the_real_rows_alone(dropout):
    """With `real` rows given, a segment's real rows get the deltas (and gradients) of those rows
    run alone with the same stream; its other rows (padding) are dropped, however many."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 6, generator=gen, requires_grad=True)
    As = [torch.randn(r, 6, generator=gen, requires_grad=True) for r in (2, 3)]
    Bs = [torch.randn(5, r, generator=gen, requires_grad=True) for r in (2, 3)]
    segments = [(0, 3, 0), (3, 12, 1)]
    real = [None, torch.tensor([1, 2, 5, 6, 7])]            # rows 4, 5, 8, 9, 10 of x
    rows = [torch.arange(0, 3), 3 + real[1]]

    def streams():
        return [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]

    ours = segmented_lora_delta(x, segments, As, Bs, [0.5, 2.0], [dropout, dropout], True, streams(), real)
    ref = torch.zeros(12, 5)
    for (_, _, i), index, stream in zip(segments, rows, streams()):
        ref = ref.index_add(0, index, plain_lora_delta(x[index], As[i], Bs[i], [0.5, 2.0][i], dropout, True, stream))
    torch.testing.assert_close(ours, ref)
    padding = [3, 6, 7, 11]
    assert torch.equal(ours[padding], torch.zeros(4, 5))
    g = torch.randn_like(ref)
    leaves = [x, *As, *Bs]
    for a, b in zip(torch.autograd.grad((ours * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
