"""Many adapters on one frozen model: mixed batches, dense references, architectures, quantized bases."""

import copy

import pytest
import torch
from torch.func import functional_call

from mlora.model.adapted import AdapterError, MultiAdapterModel
from mlora.model.context import BatchLayout
from mlora.model.lora import LoraLinear
from tests.model.helpers import lora_cfg, randomise_b
from tests.tiny import ARCHITECTURES, tiny_model

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dense_reference_logits(plain, adapted, name, ids, mask=None):
    """Logits of the untouched HF model whose weights are ``W + s B A`` (DoRA: rescaled rows),
    computed with autograd-tracked copies of adapter `name`'s parameters.

    Returns (logits, {our parameter key: reference leaf tensor}).
    """
    leaves, weights = {}, {}
    for path, ad in adapted.adapter_modules(name).items():
        A = leaves[f"{path}.lora_A.weight"] = ad.lora_A.weight.detach().clone().requires_grad_(True)
        B = leaves[f"{path}.lora_B.weight"] = ad.lora_B.weight.detach().clone().requires_grad_(True)
        W = plain.get_submodule(path).weight
        V = W + ad.scaling * B @ A
        if ad.use_dora:
            m = leaves[f"{path}.magnitude"] = ad.magnitude.detach().clone().requires_grad_(True)
            V = V * (m / V.norm(dim=1).detach())[:, None]
        weights[f"{path}.weight"] = V
    out = functional_call(plain, weights, args=(ids,), kwargs={"attention_mask": mask, "use_cache": False})
    return out.logits, leaves


def assert_rel_close(actual, expected, tol=3e-4):
    """Close relative to the tensor's norm: gradients here reach the hundreds, so fp32
    reordering noise is judged against their size, not element by element."""
    assert actual is not None
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e}"


ADAPTERS = [
    lora_cfg("small", r=2, lora_alpha=4.0, target_modules=["q_proj", "v_proj"]),
    lora_cfg("dora", r=4, lora_alpha=8.0, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
    lora_cfg("wide", r=8, lora_alpha=32.0, use_rslora=True, target_modules=ALL7),
    lora_cfg("ffn", r=3, lora_alpha=3.0, target_modules=["gate_proj", "down_proj"]),
]


def build(arch="llama", adapters=ADAPTERS):
    plain = tiny_model(arch)
    adapted = MultiAdapterModel(copy.deepcopy(plain))
    for i, cfg in enumerate(adapters):
        adapted.add_adapter(cfg, seed=i)
        randomise_b(adapted, cfg.name, seed=i)
    return plain, adapted


def test_every_segment_of_a_mixed_batch_equals_its_dense_reference():
    plain, adapted = build()
    sizes = [("small", 2), ("dora", 1), ("wide", 2), ("ffn", 2)]
    ids = torch.randint(4, 90, (7, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[4, 5:] = 0
    out = adapted(ids, mask, BatchLayout.from_sizes(sizes))
    g = torch.randn_like(out.logits)
    (out.logits * g).sum().backward()
    start = 0
    for name, n in sizes:
        rows = slice(start, start + n)
        start += n
        ref, leaves = dense_reference_logits(plain, adapted, name, ids[rows], mask[rows])
        # Logits are O(1); fp32 kernels differ by CPU (AVX2 / AVX-512 reduction orders)
        # by up to a few 1e-5 after DoRA's norms, so 1e-4 absolute.
        torch.testing.assert_close(out.logits[rows], ref, atol=1e-4, rtol=1e-4)
        (ref * g[rows]).sum().backward()
        params = adapted.adapter_parameters(name)
        assert set(params) == set(leaves)
        for key, leaf in leaves.items():
            assert_rel_close(params[key].grad, leaf.grad)


def test_mixed_batch_equals_each_adapter_alone():
    _, adapted = build()
    ids = torch.randint(4, 90, (6, 8))
    sizes = [("wide", 2), ("dora", 2), ("small", 2)]
    mixed = adapted(ids, layout=BatchLayout.from_sizes(sizes)).logits
    start = 0
    for name, n in sizes:
        alone = adapted(ids[start:start + n], layout=BatchLayout.from_sizes([(name, n)])).logits
        torch.testing.assert_close(mixed[start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_zero_b_gives_exactly_the_base_and_only_adapters_get_gradients():
    plain = tiny_model()
    adapted = MultiAdapterModel(copy.deepcopy(plain))
    adapted.add_adapter(lora_cfg("a", target_modules=ALL7, lora_dropout=0.0))
    ids = torch.randint(4, 90, (2, 6))
    out = adapted(ids, layout=BatchLayout.from_sizes([("a", 2)]))
    assert torch.equal(out.logits, plain(ids).logits)
    out.logits.sum().backward()
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert trainable and all(".adapters.a." in n for n in trainable)
    assert with_grad == trainable
    # With B = 0 no gradient reaches A; B's gradient is what starts training.
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.grad is not None}
    assert all(g.abs().max() == 0 for n, g in grads.items() if ".lora_A." in n)
    assert all(g.abs().max() > 0 for n, g in grads.items() if ".lora_B." in n)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_matches_its_dense_reference(arch):
    plain, adapted = build(arch, [lora_cfg("x", target_modules=ALL7, use_dora=arch == "qwen2")])
    ids = torch.randint(4, 90, (2, 7))
    out = adapted(ids, layout=BatchLayout.from_sizes([("x", 2)]))
    ref, _ = dense_reference_logits(plain, adapted, "x", ids)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out.logits, plain(ids).logits)


def test_gradient_checkpointing_keeps_the_segment_layout():
    _, adapted = build()
    ids = torch.randint(4, 90, (4, 8))
    layout = lambda: BatchLayout.from_sizes([("wide", 2), ("dora", 2)])  # noqa: E731
    adapted.train()
    expected = adapted(ids, layout=layout()).logits
    expected.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in adapted.named_parameters() if p.grad is not None}
    adapted.zero_grad()
    adapted.enable_gradient_checkpointing()
    out = adapted(ids, layout=layout()).logits
    # Another forward, with another layout, runs before backward replays the first one.
    adapted(ids[:1], layout=BatchLayout.from_sizes([("small", 1)]))
    out.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for key, grad in grads.items():
        torch.testing.assert_close(dict(adapted.named_parameters())[key].grad, grad)


def test_adapters_are_registered_modules_and_can_be_removed():
    plain, adapted = build()
    names = [n for n, _ in adapted.named_modules() if ".adapters." in n]
    assert any(".adapters.dora" in n for n in names)
    assert any("adapters.wide.lora_A.weight" in k for k in adapted.state_dict())
    adapted.train()
    assert all(m.training for m in adapted.modules())
    adapted.eval()
    assert not any(m.training for m in adapted.modules())
    adapted.to(torch.float64)
    assert adapted.adapter_parameters("wide")["model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float64
    adapted.to(torch.float32)
    for cfg in ADAPTERS:
        adapted.remove_adapter(cfg.name)
    assert not any(isinstance(m, LoraLinear) for m in adapted.modules())
    ids = torch.randint(4, 90, (2, 5))
    assert torch.equal(adapted(ids).logits, plain(ids).logits)
    assert set(adapted.model.state_dict()) == set(plain.state_dict())


def test_bad_adapters_are_refused():
    _, adapted = build(adapters=[lora_cfg("a")])
    with pytest.raises(AdapterError, match="already loaded"):
        adapted.add_adapter(lora_cfg("a"))
    with pytest.raises(AdapterError, match=r"target module\(s\) \['c_attn'\] not found.*available"):
        adapted.add_adapter(lora_cfg("b", target_modules=["q_proj", "c_attn"]))
    assert "b" not in adapted.configs
    with pytest.raises(AdapterError, match="not loaded"):
        adapted.remove_adapter("nope")


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_base_runs_forward_and_backward_on_cpu(tmp_path, quantize):
    from mlora.model.loading import load_base_model
    from tests.tiny import save_tiny, word_tokenizer

    # bitsandbytes' CPU 4-bit kernels need in_features divisible by its block size (64).
    save_tiny(tiny_model(hidden=64), word_tokenizer(), tmp_path)
    model, _ = load_base_model(str(tmp_path), quantize=quantize, device="cpu")
    adapted = MultiAdapterModel(model)
    adapted.add_adapter(lora_cfg("q", target_modules=ALL7))
    adapted.add_adapter(lora_cfg("d", use_dora=True, target_modules=["q_proj", "down_proj"]))
    randomise_b(adapted, "q")
    wrapper = adapted.model.model.layers[0].self_attn.q_proj
    assert type(wrapper.base_layer).__name__ == ("Linear4bit" if quantize == "4bit" else "Linear8bitLt")
    ids = torch.randint(4, 90, (4, 6))
    out = adapted(ids, layout=BatchLayout.from_sizes([("q", 2), ("d", 2)]))
    assert torch.isfinite(out.logits).all()
    out.logits.square().mean().backward()
    grads = [p.grad for p in adapted.adapter_parameters("q").values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert adapted.adapter_parameters("d")["model.layers.0.mlp.down_proj.magnitude"].grad is not None


def test_every_name_the_config_accepts_works_in_the_model():
    """torch refuses module names with dots or that are Module attributes; adapter names may be both."""
    model, adapted = build(adapters=[])
    ids = torch.randint(0, 64, (3, 5))
    for name in ("v1.0", "train", "to"):
        adapted.add_adapter(lora_cfg(name))
        with torch.no_grad():
            adapted.adapter_parameters(name)["model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(0.1)
    assert set(adapted.configs) == {"v1.0", "train", "to"}
    assert all(k.startswith("model.layers.") for k in adapted.adapter_parameters("v1.0"))
    layout = BatchLayout.from_sizes([("v1.0", 1), ("train", 1), ("to", 1)])
    logits = adapted(ids, layout=layout).logits
    alone = adapted(ids[1:2], layout=BatchLayout.from_sizes([("train", 1)])).logits
    torch.testing.assert_close(logits[1:2], alone, rtol=1e-5, atol=1e-6)
    adapted.train()  # the Module method is still the method
    for name in ("v1.0", "train", "to"):
        adapted.remove_adapter(name)
    assert not adapted.configs


@pytest.mark.parametrize("kind", ["lora", "mixlora"])
def test_a_left_padded_row_computes_what_it_computes_unpadded(kind):
    from tests.model.test_mixlora import moe_cfg

    model = MultiAdapterModel(tiny_model())
    cfg = lora_cfg("x", target_modules=ALL7) if kind == "lora" else moe_cfg("x", target_modules=ALL7)
    model.add_adapter(cfg, seed=0)
    randomise_b(model, "x")
    model.eval()
    row = torch.randint(4, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    # Long padding: RoPE angles are computed in fp32, so positions shifted by 2000 would move
    # the logits by 3e-5 although attention only sees relative positions; counted from the
    # first real token, the row differs from alone only by fp32 rounding (2e-6).
    pad = 2000
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(row)], dim=1)
    with torch.no_grad():
        alone = model(row, layout=BatchLayout.from_sizes([("x", 1)])).logits
        left = model(padded, mask, BatchLayout.from_sizes([("x", 1)])).logits[:, pad:]
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
