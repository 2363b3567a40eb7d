"""Adapter files: PEFT compatibility both ways, bit-exact round trips, merging, the inference API."""

import copy
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from mlora import MixLoraModelForCausalLM
from mlora.io import AdapterFileError, load_adapter, merged_model, read_adapter_config, save_adapter
from mlora.model.adapted import MultiAdapterModel
from mlora.model.context import BatchLayout
from tests.model.helpers import lora_cfg, randomise_b
from tests.tiny import save_tiny, tiny_model, word_tokenizer

VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True, lora_alpha=16.0),
    "dora": dict(use_dora=True),
}
TARGETS = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]


def trained(name="ad", **kwargs):
    adapted = MultiAdapterModel(tiny_model())
    adapted.add_adapter(lora_cfg(name, target_modules=TARGETS, **kwargs), seed=3)
    randomise_b(adapted, name)
    return adapted


def ids():
    return torch.randint(4, 90, (3, 8), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_our_files_and_gives_the_same_logits(tmp_path, variant):
    adapted = trained(**VARIANTS[variant])
    save_adapter(adapted, "ad", tmp_path, base_model_name_or_path="tiny")
    ours = adapted(ids(), layout=BatchLayout.from_sizes([("ad", 3)])).logits
    peft_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids()).logits, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_we_load_peft_made_files_and_give_the_same_logits(tmp_path, variant):
    settings = VARIANTS[variant]
    torch.manual_seed(1)
    peft_model = get_peft_model(tiny_model(), PeftLoraConfig(
        r=4, lora_alpha=settings.get("lora_alpha", 8), target_modules=TARGETS,
        use_dora=settings.get("use_dora", False), use_rslora=settings.get("use_rslora", False),
        init_lora_weights=False))  # random B so the adapter changes the output
    peft_model.save_pretrained(str(tmp_path))
    expected = peft_model.eval()(ids()).logits
    model, cfg = MixLoraModelForCausalLM.from_pretrained(tmp_path, base_model=tiny_model())
    assert cfg.r == 4 and cfg.use_dora == settings.get("use_dora", False)
    torch.testing.assert_close(model(ids()).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, tiny_model()(ids()).logits)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_bit_exact(tmp_path, variant):
    adapted = trained(**VARIANTS[variant])
    save_adapter(adapted, "ad", tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["target_modules"] == TARGETS
    fresh = MultiAdapterModel(tiny_model())
    load_adapter(fresh, tmp_path, name="ad")
    before, after = adapted.adapter_parameters("ad"), fresh.adapter_parameters("ad")
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    layout = BatchLayout.from_sizes([("ad", 3)])
    assert torch.equal(adapted(ids(), layout=layout).logits, fresh(ids(), layout=layout).logits)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_model_equals_the_adapter(tmp_path, variant):
    adapted = trained(**VARIANTS[variant])
    expected = adapted(ids(), layout=BatchLayout.from_sizes([("ad", 3)])).logits
    merged = merged_model(adapted, "ad")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert set(merged.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path)  # a plain transformers model again
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(ids()).logits, expected, atol=1e-4, rtol=1e-4)
    # The adapted model itself is untouched by merging.
    assert torch.equal(adapted(ids(), layout=BatchLayout.from_sizes([("ad", 3)])).logits, expected)


def test_inference_api_from_a_saved_base_path_is_deterministic(tmp_path):
    base_dir = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    adapted = trained(lora_dropout=0.3)
    save_adapter(adapted, "ad", tmp_path / "ad", base_model_name_or_path=base_dir)
    model, cfg = MixLoraModelForCausalLM.from_pretrained(tmp_path / "ad")
    assert not model.training and cfg.lora_dropout == 0.3
    first, second = model(ids()).logits, model(ids()).logits
    assert torch.equal(first, second)
    expected = adapted.eval()(ids(), layout=BatchLayout.from_sizes([("ad", 3)])).logits
    torch.testing.assert_close(first, expected)


def test_missing_and_malformed_folders_get_clear_errors(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        read_adapter_config(tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": }')
    with pytest.raises(AdapterFileError, match="line 2, column"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(AdapterFileError, match="peft_type 'IA3' is not supported"):
        read_adapter_config(tmp_path)
    adapted = trained()
    save_adapter(adapted, "ad", tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="holds no adapter_model.safetensors"):
        load_adapter(MultiAdapterModel(tiny_model()), tmp_path)
    with pytest.raises(AdapterFileError, match="names no base model"):
        MixLoraModelForCausalLM.from_pretrained(tmp_path)


def test_loading_into_a_config_of_another_shape_is_refused(tmp_path):
    adapted = trained()
    save_adapter(adapted, "ad", tmp_path)
    fresh = MultiAdapterModel(tiny_model())
    with pytest.raises(AdapterFileError, match="r=4 but the config asks for r=8"):
        load_adapter(fresh, tmp_path, cfg=lora_cfg("ad", r=8, target_modules=TARGETS))
    assert "ad" not in fresh.configs


def test_bin_files_are_read_without_running_code(tmp_path):
    adapted = trained()
    save_adapter(adapted, "ad", tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"x": copy.deepcopy}, tmp_path / "adapter_model.bin")  # a pickled function
    with pytest.raises(AdapterFileError, match="not a plain tensor file"):
        load_adapter(MultiAdapterModel(tiny_model()), tmp_path)


@pytest.mark.parametrize("folder_name", ["_under", ".dotted", "-dash", "(paren)", "donn\u00e9es", "v1.0"])
def test_an_adapter_loads_from_any_folder_name(tmp_path, folder_name, monkeypatch):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(lora_cfg("a"), seed=0)
    randomise_b(model, "a")
    folder = tmp_path / folder_name
    save_adapter(model, "a", folder)
    ids = torch.randint(4, 90, (1, 6))
    want = model(ids, layout=BatchLayout.from_sizes([("a", 1)])).logits
    adapted, cfg = MixLoraModelForCausalLM.from_pretrained(folder, base_model=tiny_model())
    torch.testing.assert_close(adapted(ids).logits, want)
    monkeypatch.chdir(folder)  # `cd` into it and load "."
    again, _ = MixLoraModelForCausalLM.from_pretrained(".", base_model=tiny_model())
    torch.testing.assert_close(again(ids).logits, want)


def test_truncated_weights_are_an_adapter_file_error(tmp_path):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(lora_cfg("a"), seed=0)
    save_adapter(model, "a", tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 7])
    with pytest.raises(AdapterFileError, match="damaged or truncated"):
        MixLoraModelForCausalLM.from_pretrained(tmp_path / "a", base_model=tiny_model())
