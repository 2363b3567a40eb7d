"""Triton grouped-LoRA kernels against the torch path and plain expressions.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set here before anything imports Triton); the shapes stay tiny because the interpreter
runs every program in Python. With CUDA the same tests run the compiled kernels on the
GPU, and the ``gpu``-marked ones add larger shapes and the backend choice.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import torch.nn.functional as F

from mlora.kernels import backend, triton_lora
from mlora.kernels import lora as torch_lora
from mlora.kernels.expert_ffn import ExpertLoraWeights, expert_ffn
from mlora.kernels.triton_lora import BLOCK_M, Groups, grouped_expand, grouped_shrink
from tests.kernels.plain import plain_lora_delta

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRETED else "cuda"
TIGHT = {"rtol": 1e-5, "atol": 1e-5}
# Gradients cast back to a bf16 input: one bf16 rounding apart at most.
LOOSE = {"rtol": 1.6e-2, "atol": 1e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device")


def rnd(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype).requires_grad_(True)


def grads(outputs, inputs, seed=11):
    """Gradients of a fixed random projection of `outputs` (same cotangents for every caller)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def assert_grads_close(ours, ref, inputs):
    for a, b, leaf in zip(ours, ref, inputs):
        assert a.dtype == b.dtype == leaf.dtype
        torch.testing.assert_close(a, b, **(LOOSE if leaf.dtype == torch.bfloat16 else TIGHT))


# --------------------------------------------------------------------------- groups


def test_groups_drop_empty_groups_and_tile_the_rest():
    groups = Groups.build([(0, BLOCK_M + 3), (40, 40), (50, 52)], [1, 0, 1], [2.0, 3.0, 4.0], [1.0, 1.0, 1.25], "cpu")
    assert groups.start.tolist() == [0, 50] and groups.end.tolist() == [BLOCK_M + 3, 52]
    assert groups.slot.tolist() == [1, 1]
    assert groups.scale.tolist() == [2.0, 4.0] and groups.inv_keep.tolist() == [1.0, 1.25]
    assert groups.tile_group.tolist() == [0, 0, 1]
    assert groups.tile_row.tolist() == [0, BLOCK_M, 50]


# --------------------------------------------------------------------------- segmented LoRA


SEGMENTS = [(0, 4, 0), (4, 4, 1), (5, 9, 2), (9, 11, 0)]  # an empty segment, row 4 in no segment, adapter 0 twice
RANKS, SCALINGS = [2, 3, 5], [0.5, 2.0, 1.5]


def segmented_problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = rnd(gen, 11, 9, dtype=dtype)
    As = [rnd(gen, r, 9, scale=0.5) for r in RANKS]
    Bs = [rnd(gen, 7, r, scale=0.5) for r in RANKS]
    return x, As, Bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropouts", [[0.0, 0.0, 0.0], [0.2, 0.5, 0.0]])
def test_segmented_lora_matches_the_torch_path_per_segment(dtype, dropouts):
    x, As, Bs = segmented_problem(dtype)

    def streams():  # one random stream per adapter, as the engine keeps them
        return [torch.Generator(DEVICE).manual_seed(100 + a) for a in range(len(RANKS))]

    ours = triton_lora.segmented_lora_delta(x, SEGMENTS, As, Bs, SCALINGS, dropouts, True, streams())
    ref_streams = streams()
    pieces, position = [], 0
    for start, end, a in SEGMENTS:
        if start > position:
            pieces.append(torch.zeros(start - position, 7, device=DEVICE))
        pieces.append(plain_lora_delta(x[start:end], As[a], Bs[a], SCALINGS[a], dropouts[a], True, ref_streams[a]))
        position = end
    ref = torch.cat(pieces)
    assert ours.dtype == torch.float32 and ours.shape == (11, 7)
    torch.testing.assert_close(ours, ref, **TIGHT)
    assert torch.equal(ours[4], torch.zeros(7, device=DEVICE))
    inputs = (x, *As, *Bs)
    assert_grads_close(grads(ours, inputs), grads(ref, inputs), inputs)


def test_segmented_dropout_keeps_each_adapter_with_its_own_probability():
    # in = out = rank = 1 with unit weights: the delta is the kept-and-rescaled input itself.
    x = torch.ones(600, 1, device=DEVICE)
    ones = [torch.ones(1, 1, device=DEVICE)] * 2
    segments = [(0, 300, 0), (300, 600, 1)]
    out = triton_lora.segmented_lora_delta(x, segments, ones, ones, [1.0, 1.0], [0.5, 0.0], training=True)[:, 0]
    first = out[:300]
    assert set(first.unique().tolist()) <= {0.0, 2.0} and 0.4 < (first == 2.0).float().mean().item() < 0.6
    assert torch.equal(out[300:], torch.ones(300, device=DEVICE))
    evaluated = triton_lora.segmented_lora_delta(x, segments, ones, ones, [1.0, 1.0], [0.5, 0.0], training=False)
    assert torch.equal(evaluated, x)


def test_segmented_lora_draws_the_torch_path_masks_over_real_rows():
    x, As, Bs = segmented_problem(torch.float32)
    # Per segment, the real rows (offsets from its start); padding rows get no delta.
    real = [torch.tensor([0, 2, 3], device=DEVICE), None, torch.tensor([1, 3], device=DEVICE), None]

    def streams():
        return [torch.Generator(DEVICE).manual_seed(100 + a) for a in range(len(RANKS))]

    dropouts = [0.2, 0.5, 0.3]
    ours = triton_lora.segmented_lora_delta(x, SEGMENTS, As, Bs, SCALINGS, dropouts, True, streams(), real)
    ref = torch_lora.segmented_lora_delta(x, SEGMENTS, As, Bs, SCALINGS, dropouts, True, streams(), real)
    torch.testing.assert_close(ours, ref, **TIGHT)
    assert torch.equal(ours[[1, 5, 7]], torch.zeros(3, 7, device=DEVICE))
    inputs = (x, *As, *Bs)
    assert_grads_close(grads(ours, inputs), grads(ref, inputs), inputs)


def test_grouped_products_with_a_given_mask_match_the_plain_expression():
    gen = torch.Generator().manual_seed(1)
    x = rnd(gen, 10, 6)
    A, B = rnd(gen, 2, 3, 6), rnd(gen, 2, 5, 3)
    mask = (torch.rand(10, 6, generator=gen) < 0.7).to(DEVICE)
    bounds, slots, scales, keeps = [(0, 3), (3, 3), (3, 10)], [1, 0, 0], [2.0, 1.0, 0.5], [0.8, 1.0, 0.6]
    groups = Groups.build(bounds, slots, scales, [1 / k for k in keeps], DEVICE)
    ours = grouped_expand(grouped_shrink(x, A, groups, mask=mask), B, groups)
    ref = torch.cat([s * (x[a:b] * mask[a:b] / k) @ A[e].T @ B[e].T
                     for (a, b), e, s, k in zip(bounds, slots, scales, keeps)])
    torch.testing.assert_close(ours, ref, **TIGHT)
    inputs = (x, A, B)
    assert_grads_close(grads(ours, inputs), grads(ref, inputs), inputs)


def test_ranks_above_one_rank_block_loop_over_chunks():
    gen = torch.Generator().manual_seed(3)
    x, A, B = rnd(gen, 3, 5), rnd(gen, 70, 5, scale=0.2), rnd(gen, 4, 70, scale=0.2)
    ours = triton_lora.segmented_lora_delta(x, [(0, 3, 0)], [A], [B], [0.25], [0.0], training=False)
    ref = 0.25 * x @ A.T @ B.T
    torch.testing.assert_close(ours, ref, **TIGHT)
    inputs = (x, A, B)
    assert_grads_close(grads(ours, inputs), grads(ref, inputs), inputs)


# --------------------------------------------------------------------------- expert LoRA


def routed_pairs(device=DEVICE):
    """Top-2 routing of 6 tokens over 4 experts, pairs sorted by expert; expert 1 gets none."""
    token = torch.tensor([0, 1, 3, 5, 0, 1, 2, 3, 4, 2, 4, 5], device=device)
    counts = [4, 0, 5, 3]
    return token, counts


def expert_groups(counts, scale=1.0):
    bounds = [(sum(counts[:e]), sum(counts[:e + 1])) for e in range(len(counts))]
    return Groups.build(bounds, list(range(len(counts))), [scale] * len(counts), [1.0] * len(counts), DEVICE)


def test_gathered_shrink_accumulates_the_gradient_of_repeated_tokens():
    gen = torch.Generator().manual_seed(4)
    token, counts = routed_pairs()
    expert = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).to(DEVICE)
    x, A = rnd(gen, 6, 7), rnd(gen, 4, 3, 7)
    ours = grouped_shrink(x, A, expert_groups(counts), src=token)
    ref = torch.einsum("pk,prk->pr", x[token], A[expert])
    torch.testing.assert_close(ours, ref, **TIGHT)
    inputs = (x, A)
    ours_g, ref_g = grads(ours, inputs), grads(ref, inputs)
    assert_grads_close(ours_g, ref_g, inputs)
    assert torch.equal(ours_g[1][1], torch.zeros(3, 7, device=DEVICE))  # the idle expert


def test_weighted_scatter_expand_matches_index_add():
    gen = torch.Generator().manual_seed(5)
    token, counts = routed_pairs()
    expert = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).to(DEVICE)
    z, B = rnd(gen, 12, 3), rnd(gen, 4, 5, 3)
    w = torch.rand(12, generator=gen).to(DEVICE).requires_grad_(True)
    ours = grouped_expand(z, B, expert_groups(counts, scale=0.5), dst=token, weight=w, n_out=6)
    per_pair = 0.5 * torch.einsum("pr,por->po", z, B[expert])
    ref = torch.zeros(6, 5, device=DEVICE).index_add(0, token, w[:, None] * per_pair)
    torch.testing.assert_close(ours, ref, **TIGHT)
    inputs = (z, B, w)
    assert_grads_close(grads(ours, inputs), grads(ref, inputs), inputs)


def expert_problem(dtype, dropouts, present=("gate", "up", "down"), seed=6):
    gen = torch.Generator().manual_seed(seed)
    N, H, I, E, r = 6, 8, 10, 4, 3
    x, g, u = rnd(gen, N, H, dtype=dtype), rnd(gen, N, I, dtype=dtype), rnd(gen, N, I, dtype=dtype)
    token, counts = routed_pairs()
    weight = torch.rand(token.shape[0], generator=gen).to(DEVICE).requires_grad_(True)
    shapes = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    proj = {name: ExpertLoraWeights(rnd(gen, E, r, i, scale=0.5), rnd(gen, E, o, r, scale=0.5), 0.75, dropouts[name])
            if name in present else None for name, (i, o) in shapes.items()}
    return x, g, u, token, weight, counts, proj


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("present", [("gate", "up", "down"), ("up", "down"), ("gate", "up")])
@pytest.mark.parametrize("dropouts", [{"gate": 0.0, "up": 0.0, "down": 0.0}, {"gate": 0.2, "up": 0.1, "down": 0.3}])
def test_expert_ffn_matches_the_torch_path(dtype, present, dropouts):
    x, g, u, token, weight, counts, proj = expert_problem(dtype, dropouts, present)
    args = (x, g, u, token, weight, counts, F.silu, proj["gate"], proj["up"], proj["down"], True)
    # The same draws, from the global RNG here, give the same dropout masks.
    torch.manual_seed(8)
    ours = triton_lora.expert_ffn(*args)
    torch.manual_seed(8)
    ref = expert_ffn(*args)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, **TIGHT)
    inputs = (x, g, u, weight, *[t for p in proj.values() if p is not None for t in (p.A, p.B)])
    assert_grads_close(grads(ours, inputs), grads(ref, inputs), inputs)


def test_expert_ffn_without_grad_matches_the_torch_path():
    x, g, u, token, weight, counts, proj = expert_problem(torch.float32, {"gate": 0.1, "up": 0.1, "down": 0.1})
    args = (x, g, u, token, weight, counts, F.gelu, proj["gate"], proj["up"], proj["down"], False)
    with torch.no_grad():
        for a, b in zip(triton_lora.expert_ffn(*args), expert_ffn(*args)):
            torch.testing.assert_close(a, b, **TIGHT)


def test_grouped_shrink_names_the_shapes_it_refuses():
    groups = Groups.build([(0, 2)], [0], [1.0], [1.0], DEVICE)
    x, A = torch.ones(2, 3, device=DEVICE), torch.ones(1, 1, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"mask \(1, 2, 3\)"):
        grouped_shrink(x, A, groups, mask=torch.ones(1, 2, 3, dtype=torch.bool, device=DEVICE))


# --------------------------------------------------------------------------- backend


def test_backend_takes_the_torch_path_off_cuda():
    x = torch.randn(3, 4)
    assert not backend.use_triton(x)
    A, B = torch.randn(2, 4), torch.randn(5, 2)
    base = torch.randn(3, 5)
    ours = backend.segmented_lora_add(base.clone(), x, [(0, 3, 0)], [A], [B], [2.0], [0.0], False)
    torch.testing.assert_close(ours, base + plain_lora_delta(x, A, B, 2.0, 0.0, False))
    gen = torch.Generator().manual_seed(9)
    g, u = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    proj = ExpertLoraWeights(torch.randn(2, 1, 4, generator=gen), torch.randn(2, 6, 1, generator=gen), 1.0, 0.0)
    token, weight = torch.tensor([0, 2, 1]), torch.tensor([1.0, 0.5, 0.25])
    args = (x, g, u, token, weight, [2, 1], F.silu, proj, None, None, False)
    for a, b in zip(backend.expert_ffn(*args), expert_ffn(*args)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_backend_uses_triton_on_cuda_unless_disabled(monkeypatch):
    x = torch.randn(3, 4, device="cuda")
    assert backend.use_triton(x)
    monkeypatch.setenv(backend.DISABLE_ENV, "1")
    assert not backend.use_triton(x)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tiles_and_contended_atomics_on_cuda(dtype):
    gen = torch.Generator().manual_seed(10)
    N, H, I, E, r, M = 300, 96, 160, 8, 16, 600
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).cuda()
    x, g, u = (rand(N, H).to(dtype), rand(N, I).to(dtype), rand(N, I).to(dtype))
    expert = torch.randint(0, E - 1, (M,), generator=gen)  # the last expert stays idle
    order = torch.argsort(expert, stable=True)
    token = torch.randint(0, N, (M,), generator=gen)[order].cuda()
    counts = torch.bincount(expert, minlength=E).tolist()
    weight = torch.rand(M, generator=gen).cuda().requires_grad_(True)
    proj = [ExpertLoraWeights(rand(E, r, i, scale=0.1).requires_grad_(True), rand(E, o, r, scale=0.1).requires_grad_(True),
                              2.0, 0.0) for i, o in ((H, I), (H, I), (I, H))]
    for t in (x, g, u):
        t.requires_grad_(True)
    args = (x, g, u, token, weight, counts, F.silu, *proj, True)
    ours, ref = triton_lora.expert_ffn(*args), expert_ffn(*args)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    inputs = (x, g, u, weight, *[t for p in proj for t in (p.A, p.B)])
    for a, b, leaf in zip(grads(ours, inputs), grads(ref, inputs), inputs):
        torch.testing.assert_close(a, b, **(LOOSE if leaf.dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-3}))

