"""MixLoRA / MixDoRA FFNs: shared-base path vs per-expert reference vs an independent token loop.

The router's own tests (strategies, balance and z losses) are in test_router.py.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from mlora.config import ExpertLoraConfig, MixLoraConfig
from mlora.model.adapted import MultiAdapterModel
from mlora.model.context import AdapterContext, BatchLayout
from mlora.model.mixlora import MixLoraFFN
from mlora.model.router import route, router_aux_loss
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.reference_moe import use_reference
from tests.tiny import tiny_model

STRATEGIES = {
    "mixlora": dict(routing_strategy="mixlora", top_k=2),
    "switch": dict(routing_strategy="mixlora-switch", expert_capacity=2),
    "dynamic": dict(routing_strategy="mixlora-dynamic", top_p=0.6),
}


def moe_cfg(name, strategy="mixlora", **kwargs):
    settings = dict(num_experts=4, r=4, lora_alpha=8.0, lora_dropout=0.0, router_init_range=0.5,
                    task_name="arc-c", **STRATEGIES[strategy])
    settings.update(kwargs)
    return MixLoraConfig(name=name, **settings)


def grads(model, name):
    return {k: p.grad.clone() for k, p in model.adapter_parameters(name).items()}


def assert_rel_close(actual, expected, tol=1e-4):
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_shared_base_equals_per_expert_reference(strategy, dora):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(moe_cfg("m", strategy, use_dora=dora), seed=0)
    randomise_b(model, "m")
    ids = torch.randint(4, 90, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    runs = {}
    for ref in (False, True):
        use_reference(model, ref)
        out = model(ids, mask, BatchLayout.from_sizes([("m", 3)]))
        loss = out.logits.square().mean() + router_aux_loss(model.configs["m"], out.router_logits["m"])
        loss.backward()
        runs[ref] = (out.logits.detach(), grads(model, "m"))
        model.zero_grad()
    torch.testing.assert_close(runs[False][0], runs[True][0], atol=1e-5, rtol=1e-5)
    assert set(runs[False][1]) == set(runs[True][1])
    for key, g in runs[True][1].items():
        assert_rel_close(runs[False][1][key], g)
    if strategy == "switch":
        # Capacity 2 per expert per sequence over 8 tokens and 4 experts: some tokens overflow.
        ffn = model.model.model.layers[0].mlp
        h = torch.randn(3 * 8, 32)
        r = route(ffn.moes["m"].moe_gate.logits(h), "mixlora-switch", capacity=2, seq_len=8)
        assert bool(r.dropped.any())


TRAINING = {
    "mixlora": ("mixlora", {}),
    "switch": ("switch", {"ffn_dropout": 0.2}),
    "dynamic": ("dynamic", {}),
    "mixdora": ("mixlora", {"expert_lora": ExpertLoraConfig(use_dora=True)}),
}


@pytest.mark.parametrize("kind", list(TRAINING))
def test_shared_base_equals_per_expert_reference_while_training(kind):
    """Dropout and jitter on: the same stream gives both paths the same draws, one mask per projection."""
    strategy, extra = TRAINING[kind]
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(moe_cfg("m", strategy, lora_dropout=0.3, jitter_noise=0.1, **extra,
                              target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]), seed=0)
    randomise_b(model, "m")
    model.train()
    ids = torch.randint(4, 90, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    runs = {}
    for ref, seed in ((False, 5), (True, 5), (False, 6)):
        use_reference(model, ref)
        layout = BatchLayout.from_sizes([("m", 3)], generators={"m": torch.Generator().manual_seed(seed)})
        out = model(ids, mask, layout)
        loss = out.logits.square().mean() + router_aux_loss(model.configs["m"], out.router_logits["m"])
        loss.backward()
        runs[ref, seed] = (out.logits.detach(), grads(model, "m"))
        model.zero_grad()
    (fast, fast_grads), (ref, ref_grads) = runs[False, 5], runs[True, 5]
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert set(fast_grads) == set(ref_grads)
    for key, g in ref_grads.items():
        assert_rel_close(fast_grads[key], g)
    # The draws matter: another stream gives other logits.
    assert not torch.allclose(runs[False, 6][0], fast, atol=1e-3, rtol=1e-3)


def token_loop_ffn(mlp, moe, h, strategy, top_k=2, top_p=1.0, capacity=0, seq_len=None):
    """An independent per-token MixLoRA FFN: plain tensors, Python loops, no mlora code."""
    Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    Wr = moe.moe_gate.weight
    ex = {p: (moe.experts[p].lora_A, moe.experts[p].lora_B, moe.experts[p].scaling) for p in moe.experts}
    act = F.silu
    out = torch.zeros_like(h)
    used = {}
    for t in range(h.shape[0]):
        x = h[t]
        p = torch.softmax(Wr @ x, dim=0)
        if strategy == "mixlora":
            w, e = p.topk(top_k)
            chosen = list(zip(e.tolist(), (w / w.sum()).tolist()))
        elif strategy == "mixlora-dynamic":
            order = p.argsort(descending=True).tolist()
            chosen, mass = [], 0.0
            for e in order:
                chosen.append((e, p[e].item()))
                mass += p[e].item()
                if mass >= top_p:
                    break
        else:
            e = int(p.argmax())
            seq = t // seq_len
            used[(seq, e)] = used.get((seq, e), 0) + 1
            if used[(seq, e)] > capacity:
                out[t] = Wd @ (act(Wg @ x) * (Wu @ x))
                continue
            chosen = [(e, p[e].item())]
        for e, w in chosen:
            def proj(name, W, v):
                y = W @ v
                if name in ex:
                    A, B, s = ex[name]
                    y = y + s * B[e] @ (A[e] @ v)
                return y
            a = act(proj("gate_proj", Wg, x)) * proj("up_proj", Wu, x)
            out[t] += w * proj("down_proj", Wd, a)
    return out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_ffn_matches_an_independent_token_loop(strategy):
    mlp = copy.deepcopy(tiny_model().model.layers[0].mlp)
    ctx = AdapterContext()
    ffn = MixLoraFFN(mlp, ctx)
    cfg = moe_cfg("m", strategy, target_modules=["gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    moe = ffn.add(cfg)
    with torch.no_grad():
        for ex in moe.experts.values():
            ex.lora_B.normal_(std=0.3)
    ctx.default_adapter = "m"
    h = torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = token_loop_ffn(mlp, moe, h.reshape(16, 32), cfg.routing_strategy, top_k=cfg.top_k,
                                  top_p=cfg.top_p, capacity=cfg.expert_capacity, seq_len=8)
        got = ffn(h).reshape(16, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_expert_top1_equals_plain_lora():
    plain = tiny_model()
    moe_model = MultiAdapterModel(copy.deepcopy(plain))
    lora_model = MultiAdapterModel(copy.deepcopy(plain))
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    moe_model.add_adapter(moe_cfg("m", num_experts=1, top_k=1, target_modules=targets))
    lora_model.add_adapter(lora_cfg("l", target_modules=targets))
    randomise_b(moe_model, "m")
    moe_params = moe_model.adapter_parameters("m")
    with torch.no_grad():
        for key, p in lora_model.adapter_parameters("l").items():
            # model.layers.0.mlp.up_proj.lora_A.weight -> model.layers.0.mlp.experts.up_proj.lora_A [0]
            ffn = re.match(r"(.*\.mlp)\.(\w+)\.(lora_[AB])\.weight$", key)
            p.copy_(moe_params[f"{ffn[1]}.experts.{ffn[2]}.{ffn[3]}"][0] if ffn else moe_params[key])
    ids = torch.randint(4, 90, (2, 7))
    a = moe_model(ids, layout=BatchLayout.from_sizes([("m", 2)])).logits
    b = lora_model(ids, layout=BatchLayout.from_sizes([("l", 2)])).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, plain(ids).logits)


def test_mixed_lora_mixlora_switch_batch_equals_each_alone():
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(lora_cfg("plain", target_modules=["q_proj", "gate_proj", "down_proj"]), seed=0)
    model.add_adapter(moe_cfg("topk", use_dora=True), seed=1)
    model.add_adapter(moe_cfg("sw", "switch"), seed=2)
    model.add_adapter(moe_cfg("dyn", "dynamic", expert_lora=ExpertLoraConfig(r=2, lora_alpha=4.0)), seed=3)
    for i, name in enumerate(["plain", "topk", "sw", "dyn"]):
        randomise_b(model, name, seed=i)
    ids = torch.randint(4, 90, (8, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    sizes = [("topk", 2), ("plain", 2), ("sw", 2), ("dyn", 2)]
    mixed = model(ids, mask, BatchLayout.from_sizes(sizes))
    start = 0
    for name, n in sizes:
        rows = slice(start, start + n)
        alone = model(ids[rows], mask[rows], BatchLayout.from_sizes([(name, n)]))
        torch.testing.assert_close(mixed.logits[rows], alone.logits, atol=1e-5, rtol=1e-5)
        if name != "plain":
            for (lm, mm), (la, ma) in zip(mixed.router_logits[name], alone.router_logits[name]):
                torch.testing.assert_close(lm, la, atol=1e-5, rtol=1e-5)
                assert torch.equal(mm, ma)
        start += n
    assert "plain" not in mixed.router_logits
    assert model.adapter_parameters("dyn")["model.layers.0.mlp.experts.up_proj.lora_A"].shape == (4, 2, 32)


def test_padding_does_not_change_real_tokens_or_losses():
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(moe_cfg("m", "switch"), seed=0)
    randomise_b(model, "m")
    ids = torch.randint(4, 90, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    a = model(ids, layout=BatchLayout.from_sizes([("m", 1)]))
    b = model(padded, mask, BatchLayout.from_sizes([("m", 1)]))
    torch.testing.assert_close(b.logits[:, :6], a.logits, atol=1e-5, rtol=1e-5)
    cfg = model.configs["m"]
    torch.testing.assert_close(router_aux_loss(cfg, b.router_logits["m"]), router_aux_loss(cfg, a.router_logits["m"]))


def test_inference_is_deterministic_with_jitter_and_dropout():
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(moe_cfg("m", jitter_noise=0.1, lora_dropout=0.2), seed=0)
    randomise_b(model, "m")
    model.eval()
    ids = torch.randint(4, 90, (2, 6))
    lay = lambda: BatchLayout.from_sizes([("m", 2)])  # noqa: E731
    assert torch.equal(model(ids, layout=lay()).logits, model(ids, layout=lay()).logits)
    model.train()
    assert not torch.equal(model(ids, layout=lay()).logits, model(ids, layout=lay()).logits)


def test_sparse_step_puts_experts_on_every_nth_layer():
    model = MultiAdapterModel(tiny_model(layers=4))
    model.add_adapter(moe_cfg("m", sparse_step=2), seed=0)
    layers = model.model.model.layers
    assert [isinstance(layer.mlp, MixLoraFFN) for layer in layers] == [True, False, True, False]
    keys = model.adapter_parameters("m")
    assert "model.layers.1.mlp.gate_proj.lora_A.weight" in keys
    assert "model.layers.0.mlp.experts.gate_proj.lora_A" in keys
