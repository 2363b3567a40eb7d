"""The inference API as the MixLoRA README uses it: the returned config names the base model,
and an adapter may be named by a hub id.

Reference values come from the official `mixlora` package and from peft reading the same files.
"""

import pytest
import torch
from transformers import AutoTokenizer

from mlora import MixLoraModelForCausalLM
from mlora.config import ConfigError, adapter_from_dict
from mlora.io import save_adapter
from mlora.model.adapted import MultiAdapterModel
from tests.hub_cache import offline_hub, publish
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.model.test_mixlora_files import package_eval
from tests.tiny import save_tiny, tiny_model, word_tokenizer

PROMPT = "what is the cat ?"


def saved(tmp_path, cfg, base):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(cfg, seed=0)
    randomise_b(model, cfg.name)
    return save_adapter(model, cfg.name, tmp_path / cfg.name, base_model_name_or_path=base)


@pytest.fixture
def base(tmp_path):
    return save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")


def readme_snippet(MixLoraModelForCausalLM, name_or_path_to_the_adapter):
    """The README's two lines as written; returns what they make."""
    model, config = MixLoraModelForCausalLM.from_pretrained(name_or_path_to_the_adapter)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
    return model, config, tokenizer


def test_readme_snippet_as_written_matches_the_mixlora_package(tmp_path, base):
    mixlora = pytest.importorskip("mixlora")
    import mlora

    folder = str(saved(tmp_path, moe_cfg("m", lora_dropout=0.05), base))
    ours, config, tokenizer = readme_snippet(mlora.MixLoraModelForCausalLM, folder)
    theirs, their_config, their_tokenizer = readme_snippet(mixlora.MixLoraModelForCausalLM, folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, their_tokenizer(PROMPT, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, package_eval(theirs)(ids).logits, atol=1e-5, rtol=1e-5)
    assert config.base_model_name_or_path == their_config.base_model_name_or_path == base
    assert (config.peft_type, config.task_type) == (their_config.peft_type_, their_config.task_type_)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (
        their_config.lora_r_, their_config.lora_alpha_, their_config.lora_dropout_)
    assert (config.routing_strategy, config.num_experts, config.top_k, config.act_fn) == (
        their_config.routing_strategy_, their_config.num_experts_, their_config.top_k_, their_config.act_fn_)
    assert set(config.target_modules) == {k for k, v in their_config.target_modules_.items() if v}


def test_lora_config_carries_what_peft_reads(tmp_path, base):
    from peft import PeftConfig

    folder = saved(tmp_path, lora_cfg("plain", use_dora=True), base)
    _, config = MixLoraModelForCausalLM.from_pretrained(folder)
    peft = PeftConfig.from_pretrained(str(folder))
    assert config.base_model_name_or_path == peft.base_model_name_or_path == base
    assert (config.peft_type, config.task_type) == (peft.peft_type, peft.task_type) == ("LORA", "CAUSAL_LM")
    assert (config.r, config.lora_alpha, config.use_dora) == (peft.r, peft.lora_alpha, peft.use_dora)
    assert set(config.target_modules) == set(peft.target_modules)


def test_base_model_name_is_the_base_actually_loaded(tmp_path, base):
    folder = saved(tmp_path, lora_cfg("plain"), "someone/not-downloaded")
    other = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "other")
    _, config = MixLoraModelForCausalLM.from_pretrained(folder, base_model=other)
    assert config.base_model_name_or_path == other  # the tokenizer must match the weights used
    _, config = MixLoraModelForCausalLM.from_pretrained(folder, base_model=tiny_model())
    assert config.base_model_name_or_path == "someone/not-downloaded"  # an unnamed in-memory model


def test_hub_ids_for_adapter_and_base_from_an_offline_cache(tmp_path, monkeypatch, base, no_network):
    folder = saved(tmp_path, moe_cfg("m"), "owner/tiny-base")
    hf_home = offline_hub(monkeypatch, tmp_path / "hf")
    publish(hf_home, "owner/tiny-base", base)
    publish(hf_home, "owner/alpaca-mixlora-tiny", folder)
    monkeypatch.chdir(tmp_path)
    by_id, config = MixLoraModelForCausalLM.from_pretrained("owner/alpaca-mixlora-tiny")
    by_folder, _ = MixLoraModelForCausalLM.from_pretrained(folder, base_model=base)
    # Named after the repository, not after the snapshot's commit hash.
    assert config.name == "alpaca-mixlora-tiny" and config.base_model_name_or_path == "owner/tiny-base"
    tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)  # the README's next line
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(by_id(ids).logits, by_folder(ids).logits)
    assert no_network == []  # the ids came from the hand-built cache: no connection was even tried


def test_base_model_name_is_no_run_config_key():
    # Set on configs read from adapter files only; a run config naming it would do nothing.
    with pytest.raises(ConfigError, match="base_model_name_or_path: unknown key"):
        adapter_from_dict({"name": "a", "task_name": "arc-c", "base_model_name_or_path": "x"})
    assert adapter_from_dict({"name": "a", "task_name": "arc-c"}).base_model_name_or_path is None
