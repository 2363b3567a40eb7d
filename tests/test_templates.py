"""The shipped templates and example configs load and carry the MixLoRA paper's settings."""

import json
from pathlib import Path

import pytest

from mlora.config import LoraConfig, MixLoraConfig, load_config

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ["lora", "dora", "mixlora", "mixdora", "mixlora-switch", "mixlora-dynamic"]
SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def template(name):
    cfg = load_config(REPO / "templates" / f"{name}.json")
    assert len(cfg.lora) == 1
    return cfg, cfg.lora[0]


def test_template_folder_holds_exactly_the_documented_templates():
    assert sorted(p.stem for p in (REPO / "templates").glob("*.json")) == sorted(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_with_shared_defaults(name):
    cfg, a = template(name)
    assert (a.optim, a.lr, a.batch_size, a.micro_batch_size, a.evaluate_batch_size) == ("adamw", 2e-4, 16, 8, 16)
    assert (a.num_epochs, a.lora_dropout, a.scheduler_type) == (2, 0.05, "constant")
    assert set(a.target_modules) == SEVEN
    assert (cfg.cutoff_len, cfg.save_step, cfg.train_strategy) == (512, 1000, "optim")
    # A template is a runnable instruction-tuning config on its own (MixLoRA's alpaca baseline).
    assert a.task_sources == [("casual", "yahma/alpaca-cleaned")] and a.prompt == "alpaca"


@pytest.mark.parametrize("name, dora", [("lora", False), ("dora", True)])
def test_lora_and_dora_templates(name, dora):
    _, a = template(name)
    assert type(a) is LoraConfig
    assert (a.r, a.lora_alpha, a.use_dora) == (80, 160, dora)  # parameter count matched to MixLoRA


@pytest.mark.parametrize(
    "name, strategy, dora",
    [("mixlora", "mixlora", False), ("mixdora", "mixlora", True),
     ("mixlora-switch", "mixlora-switch", False), ("mixlora-dynamic", "mixlora-dynamic", False)],
)  # fmt: skip
def test_mixlora_templates(name, strategy, dora):
    _, a = template(name)
    assert isinstance(a, MixLoraConfig)
    assert (a.routing_strategy, a.use_dora, a.r, a.lora_alpha) == (strategy, dora, 16, 32)
    assert (a.num_experts, a.router_aux_loss_coef, a.router_init_range, a.router_loss) == (8, 0.01, 0.02, True)
    assert a.expert_settings().use_dora == dora  # MixDoRA: the experts are DoRA too


def test_strategy_specific_settings():
    assert template("mixlora")[1].top_k == 2
    assert template("mixdora")[1].top_k == 2
    switch = template("mixlora-switch")[1]
    assert (switch.expert_capacity, switch.router_z_loss_coef) == (32, 0.01)
    dynamic = template("mixlora-dynamic")[1]
    assert (dynamic.top_p, dynamic.temperature) == (0.8, 0.0)


def test_templates_use_m_lora_target_module_dicts():
    # Kept in m-LoRA's dict form on purpose: it shows the form, and the loader turns it into a list.
    raw = json.loads((REPO / "templates" / "lora.json").read_text())
    assert raw["lora"][0]["target_modules"] == {m: True for m in raw["lora"][0]["target_modules"]}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.lora and all(a.tasks for a in cfg.lora)


def test_example_configs_exist():
    names = {p.name for p in (REPO / "configs").glob("*.json")}
    assert {"mixlora_multitask.json", "lora_vs_mixlora.json"} <= names
    multi = load_config(REPO / "configs" / "mixlora_multitask.json").lora[0]
    assert multi.tasks == ["arc-c", "arc-e", "boolq", "obqa", "piqa"] and multi.is_moe
