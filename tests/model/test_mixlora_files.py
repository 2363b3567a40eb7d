"""MixLoRA files: bit-exact round trips, the official `mixlora` package, hand-built and legacy layouts."""

import json

import pytest
import torch

from mlora import MixLoraModelForCausalLM
from mlora.config import ExpertLoraConfig
from mlora.io import AdapterFileError, load_adapter, save_adapter
from mlora.model.adapted import MultiAdapterModel
from mlora.model.context import BatchLayout
from tests.model.helpers import randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer

VARIANTS = {
    "mixlora": dict(),
    "mixdora": dict(use_dora=True),
    "switch": dict(strategy="switch", router_z_loss_coef=0.01, expert_capacity=5),
    "dynamic": dict(strategy="dynamic", temperature=0.5),
    "expert_lora_sparse": dict(expert_lora=ExpertLoraConfig(r=2, lora_alpha=2.0, use_dora=True), sparse_step=2),
}
IDS = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(2))


def trained(variant, **extra):
    settings = dict(VARIANTS[variant], jitter_noise=0.05)
    settings.update(extra)
    strategy = settings.pop("strategy", "mixlora")
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(moe_cfg("m", strategy, **settings), seed=0)
    randomise_b(model, "m")
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_bit_exact(tmp_path, variant):
    model = trained(variant)
    save_adapter(model, "m", tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_model.bin").is_file()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MIXLORA" and saved["act_fn"] == "silu"
    assert saved["jitter_noise"] == 0.05 and saved["router_init_range"] == 0.5
    fresh = MultiAdapterModel(tiny_model())
    cfg = load_adapter(fresh, tmp_path, name="m")
    original = model.configs["m"]
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "lora_init",
                "routing_strategy", "num_experts", "top_k", "top_p", "temperature", "expert_capacity",
                "router_z_loss_coef", "router_aux_loss_coef", "router_init_range", "router_loss",
                "jitter_noise", "sparse_step"):
        if key in saved or key == "sparse_step":
            assert getattr(cfg, key) == getattr(original, key), key
    assert cfg.expert_settings() == original.expert_settings()
    assert cfg.act_fn == "silu"
    a, b = model.adapter_parameters("m"), fresh.adapter_parameters("m")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model.eval(), fresh.eval()
    lay = lambda: BatchLayout.from_sizes([("m", 2)])  # noqa: E731
    assert torch.equal(model(IDS, layout=lay()).logits, fresh(IDS, layout=lay()).logits)


def test_official_mixlora_package_loads_our_adapter(tmp_path):
    mixlora = pytest.importorskip("mixlora")
    base_dir = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    model = trained("mixlora", lora_dropout=0.05, jitter_noise=0.0)
    save_adapter(model, "m", tmp_path / "ad", base_model_name_or_path=base_dir)
    theirs, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "ad"))
    package_eval(theirs)
    ours = model.eval()(IDS, layout=BatchLayout.from_sizes([("m", 2)])).logits
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours, atol=1e-5, rtol=1e-5)


def test_the_official_package_drops_each_expert_projection_with_its_own_mask(tmp_path):
    """What our experts match while training: in the mixlora package every expert LoRA layer has
    its own nn.Dropout, so an expert's gate and up see the same rows of x dropped at different
    places (one mask per projection, as `mlora.kernels.expert_ffn.dropout_masks` draws them)."""
    mixlora = pytest.importorskip("mixlora")
    base_dir = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    save_adapter(trained("mixlora", lora_dropout=0.5, jitter_noise=0.0), "m", tmp_path / "ad",
                 base_model_name_or_path=base_dir)
    theirs, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "ad"))
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0], out)
        return hook

    (moe,) = theirs.model.layers[0].mlp.mixlora_moes.values()
    for name, lora in moe.experts_.items():
        lora.train()
        lora.dropout_.register_forward_hook(keep(name))
    theirs.train()
    with torch.no_grad():
        theirs(IDS)
    experts = {name.split(".")[1] for name in seen if name.endswith("gate_proj")}
    assert experts
    for e in experts:
        (x_gate, kept_gate), (x_up, kept_up) = seen[f"experts.{e}.gate_proj"], seen[f"experts.{e}.up_proj"]
        assert torch.equal(x_gate, x_up)
        assert not torch.equal(kept_gate != 0, kept_up != 0)


def package_eval(model):
    """Put the mixlora package's experts in eval mode: it keeps them in plain dicts, which
    `.eval()` does not reach, so their dropout would stay on (one of the defects we fix)."""
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


def official_layout(tmp_path, legacy=False):
    """A hand-built adapter as the mixlora package / MoE-PEFT write it (.bin only, int alpha)."""
    gen = torch.Generator().manual_seed(7)
    E, r, hidden, inter = 3, 2, 32, 64
    tensors = {}
    for L in range(2):
        for proj in ("q_proj", "v_proj"):
            out = hidden if proj == "q_proj" else 16
            tensors[f"mixlora.layers.{L}.self_attn.{proj}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)
            tensors[f"mixlora.layers.{L}.self_attn.{proj}.lora_B.weight"] = torch.randn(out, r, generator=gen) * 0.3
        gate = f"mixlora.layers.{L}.gate.weight" if legacy else f"mixlora.layers.{L}.mlp.moe_gate.weight"
        tensors[gate] = torch.randn(E, hidden, generator=gen)
        for proj, (i, o) in {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}.items():
            for e in range(E):
                if legacy:
                    name = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
                    prefix = f"mixlora.layers.{L}.experts.{e}.{name}"
                else:
                    prefix = f"mixlora.layers.{L}.mlp.{proj}.experts.{e}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, i, generator=gen)
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(o, r, generator=gen) * 0.3
    config = {
        "bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(tmp_path / "base"), "r": r, "lora_alpha": 4, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        "routing_strategy": "mixlora", "num_experts": E, "top_k": 2, "act_fn": "silu",
    }
    folder = tmp_path / ("legacy" if legacy else "official")
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.save(tensors, folder / "adapter_model.bin")
    return folder


def test_hand_built_official_layout_loads_and_routes_like_the_package(tmp_path):
    mixlora = pytest.importorskip("mixlora")
    save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    folder = official_layout(tmp_path)
    ours, cfg = MixLoraModelForCausalLM.from_pretrained(folder)
    assert cfg.num_experts == 3 and cfg.top_k == 2 and cfg.lora_alpha == 4
    theirs, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        expected = package_eval(theirs)(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, tiny_model()(IDS).logits)


def test_legacy_names_load_to_the_same_model(tmp_path):
    save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    current, _ = MixLoraModelForCausalLM.from_pretrained(official_layout(tmp_path))
    legacy, _ = MixLoraModelForCausalLM.from_pretrained(official_layout(tmp_path, legacy=True))
    with torch.no_grad():
        assert torch.equal(current(IDS).logits, legacy(IDS).logits)


def test_number_of_experts_is_fixed_once_created(tmp_path):
    model = trained("mixlora")
    save_adapter(model, "m", tmp_path)
    with pytest.raises(AdapterFileError, match="num_experts=4 but the config asks for num_experts=8"):
        load_adapter(MultiAdapterModel(tiny_model()), tmp_path, cfg=moe_cfg("m", num_experts=8))


def test_incomplete_expert_weights_are_reported(tmp_path):
    model = trained("mixlora")
    save_adapter(model, "m", tmp_path)
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    del state["mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight"]
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(state, tmp_path / "adapter_model.bin")
    fresh = MultiAdapterModel(tiny_model())
    with pytest.raises(AdapterFileError) as err:
        load_adapter(fresh, tmp_path)
    # Only the key that is gone is named: the other experts of that tensor are not "unexpected".
    assert "lack 1 key(s)" in str(err.value) and "layers.1.mlp.up_proj.experts.2.lora_B.weight" in str(err.value)
    assert "unexpected" not in str(err.value)
    assert not fresh.configs


def test_a_lora_adapter_saves_the_same_beside_a_mixlora_adapter(tmp_path):
    from mlora.io import read_weights
    from tests.model.helpers import lora_cfg

    alone = MultiAdapterModel(tiny_model())
    alone.add_adapter(lora_cfg("l", target_modules=["q_proj", "gate_proj", "down_proj"]), seed=1)
    beside = MultiAdapterModel(tiny_model())
    beside.add_adapter(moe_cfg("m"), seed=0)
    beside.add_adapter(lora_cfg("l", target_modules=["q_proj", "gate_proj", "down_proj"]), seed=1)
    assert set(alone.adapter_parameters("l")) == set(beside.adapter_parameters("l"))
    save_adapter(alone, "l", tmp_path / "alone")
    save_adapter(beside, "l", tmp_path / "beside")
    a, b = read_weights(tmp_path / "alone"), read_weights(tmp_path / "beside")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in a
    load_adapter(beside, tmp_path / "alone", name="l2")  # and it loads next to the MixLoRA too
