"""Run-config dataclasses and their validation (mlora/config.py)."""

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.config import (
    ConfigError,
    ExpertLoraConfig,
    LoraConfig,
    MixLoraConfig,
    RunConfig,
    adapter_from_dict,
    config_from_dict,
    load_config,
    to_dict,
)

REPO = Path(__file__).resolve().parent.parent
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_cfg(*adapters, **run):
    return {**run, "lora": list(adapters)}


def problems_of(d, source="<dict>"):
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, source)
    return info.value.problems


def one_problem(d, *fragments):
    """The config has exactly one problem and it contains every fragment."""
    problems = problems_of(d)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems[0]
    return problems[0]


ARC = {"name": "a", "task_name": "arc-e"}


# ------------------------------------------------------------------------------ dataclasses


def test_lora_defaults_and_properties():
    a = LoraConfig(name="x", task_name="arc-e")
    assert (a.lr, a.batch_size, a.micro_batch_size, a.num_epochs) == (3e-4, 16, 8, 2)
    assert (a.r, a.lora_alpha, a.lora_dropout) == (8, 16.0, 0.05)
    assert a.target_modules == SEVEN
    assert (a.optim, a.scheduler_type, a.protocol, a.expand_side, a.lora_init) == (
        "adamw", "constant", "choice", "right", "original"
    )  # fmt: skip
    assert a.scaling == 2.0 and a.is_moe is False
    assert LoraConfig(name="x", r=16, lora_alpha=32, use_rslora=True).scaling == pytest.approx(32 / 4)


def test_bare_lora_config_is_constructible_without_data():
    # Model code builds adapters directly; "casual needs data" is a rule of a whole run.
    assert LoraConfig(name="x").task_name == "casual"
    with pytest.raises(ConfigError, match=r"lora\[0\]\.data: task 'casual'"):
        RunConfig(lora=[LoraConfig(name="x")])


def test_tasks_and_task_sources():
    a = LoraConfig(name="m", task_name="arc-c; boolq;casual", data=";b.json;notes.jsonl")
    assert a.tasks == ["arc-c", "boolq", "casual"]
    assert a.task_sources == [("arc-c", None), ("boolq", "b.json"), ("casual", "notes.jsonl")]


def test_target_modules_dict_normalised_in_post_init_and_from_json():
    a = LoraConfig(name="x", target_modules={"q_proj": True, "k_proj": False, "v_proj": True})
    assert a.target_modules == ["q_proj", "v_proj"]
    b = adapter_from_dict({**ARC, "target_modules": {"o_proj": True, "up_proj": False}})
    assert b.target_modules == ["o_proj"]
    assert adapter_from_dict({**ARC, "target_modules": ["down_proj"]}).target_modules == ["down_proj"]


def test_int_given_for_float_becomes_float():
    a = adapter_from_dict({**ARC, "lr": 1, "lora_alpha": 32})
    assert isinstance(a.lr, float) and isinstance(a.lora_alpha, float) and a.lora_alpha == 32.0


def test_mixlora_dispatch_defaults_and_expert_settings():
    m = adapter_from_dict({**ARC, "routing_strategy": "mixlora", "r": 8, "lora_alpha": 16})
    assert isinstance(m, MixLoraConfig) and m.is_moe
    assert (m.num_experts, m.top_k, m.router_aux_loss_coef, m.router_init_range) == (8, 2, 0.01, 0.02)
    assert m.expert_settings() == (8, 16.0, 0.05, False, False, "original", 2.0)
    m2 = adapter_from_dict({**ARC, "routing_strategy": "mixlora", "use_dora": True,
                            "expert_lora": {"r": 4, "lora_alpha": 16, "use_rslora": True}})  # fmt: skip
    s = m2.expert_settings()
    assert (s.r, s.lora_alpha, s.use_dora, s.use_rslora, s.lora_dropout) == (4, 16.0, True, True, 0.05)
    assert s.scaling == pytest.approx(16 / math.sqrt(4))
    assert m2.scaling == 2.0  # the attention LoRA keeps the adapter's own settings
    assert isinstance(adapter_from_dict(ARC), LoraConfig) and not isinstance(adapter_from_dict(ARC), MixLoraConfig)


# ------------------------------------------------------------------------ m-LoRA compatibility


def test_mixlora_readme_examples_load_unchanged():
    lora = {
        "name": "lora_0", "optim": "adamw", "lr": 1e-5, "batch_size": 16, "micro_batch_size": 2, "num_epochs": 3,
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": {"q_proj": True, "k_proj": False, "v_proj": True, "o_proj": False,
                           "gate_proj": True, "down_proj": True, "up_proj": True},
        "data": "yahma/alpaca-cleaned", "prompt": "alpaca", "group_by_length": False, "expand_side": "right",
    }  # fmt: skip
    topk = {**lora, "name": "topk", "routing_strategy": "mixtral", "router_init_range": 0.02, "num_experts": 8,
            "act_fn": "silu", "top_k": 2, "router_loss": True, "router_aux_loss_coef": 0.01}  # fmt: skip
    switch = {**lora, "name": "switch", "routing_strategy": "switch", "router_init_range": 0.02, "num_experts": 8,
              "act_fn": "gelu_new", "expert_capacity": 32, "jitter_noise": 0.1, "ffn_dropout": 0.1,
              "router_loss": True, "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.01,
              "expert_lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}}  # fmt: skip
    cfg = config_from_dict(run_cfg(lora, topk, switch, cutoff_len=512, save_step=1000, train_lora_candidate_num=2,
                                   train_lora_simultaneously_num=2, train_strategy="optim"))  # fmt: skip
    a, t, s = cfg.lora
    assert a.task_name == "casual" and a.target_modules == ["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]
    assert t.routing_strategy == "mixlora" and t.act_fn == "silu"
    assert s.routing_strategy == "mixlora-switch" and (s.expert_capacity, s.jitter_noise, s.ffn_dropout) == (32, 0.1, 0.1)
    assert s.expert_lora == ExpertLoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.05)


def test_mlora_generated_config_loads_unchanged():
    """The shape m-LoRA's `gen` writes (its template keys plus task_name)."""
    adapter = {
        "name": "arc_e_0", "task_name": "arc-e", "optim": "adamw", "scheduler_type": "constant", "warmup_steps": 0,
        "lr": 2e-4, "batch_size": 16, "micro_batch_size": 8, "evaluate_batch_size": 16, "num_epochs": 2, "r": 16,
        "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": {m: True for m in SEVEN},
        "routing_strategy": "mixlora-dynamic", "num_experts": 8, "top_p": 0.8, "group_by_length": False,
        "loraplus_lr_ratio": 1.0, "use_dora": False, "use_rslora": False, "lora_init": "original",
        "evaluate_steps": 0, "momentum": 0.0, "weight_decay": 0.0, "temperature": 0.0,
    }  # fmt: skip
    cfg = config_from_dict(run_cfg(adapter, cutoff_len=512, save_step=1000, train_lora_candidate_num=2,
                                   train_lora_simultaneously_num=2, train_strategy="optim"))  # fmt: skip
    assert cfg.lora[0].routing_strategy == "mixlora-dynamic" and cfg.lora[0].top_p == 0.8


def test_task_name_aliases_mean_casual():
    for spelling in ("", "causal", "casual"):
        a = adapter_from_dict({"name": "a", "task_name": spelling, "data": "d.json"})
        assert a.task_name == "casual"


# ----------------------------------------------------------------------------- key problems


def test_unknown_key_names_closest_valid_key():
    problem = one_problem(run_cfg({**ARC, "lora_alfa": 16}))
    assert problem == "lora[0].lora_alfa: unknown key; did you mean lora_alpha?"
    assert one_problem(run_cfg(ARC, cutoff_lenn=3)) == "cutoff_lenn: unknown key; did you mean cutoff_len?"
    assert "did you mean" not in one_problem(run_cfg({**ARC, "zzzz": 1}), "lora[0].zzzz: unknown key")


def test_mixlora_key_on_plain_lora_adapter_explains_routing_strategy():
    one_problem(run_cfg({**ARC, "num_experts": 8}), "lora[0].num_experts", "add routing_strategy")


@pytest.mark.parametrize(
    "strategy, key, owner",
    [("mixlora", "top_p", "mixlora-dynamic"), ("mixlora-switch", "top_k", "mixlora"),
     ("mixlora-dynamic", "expert_capacity", "mixlora-switch"), ("mixlora", "router_z_loss_coef", "mixlora-switch")],
)  # fmt: skip
def test_key_of_another_routing_strategy_is_rejected(strategy, key, owner):
    one_problem(run_cfg({**ARC, "routing_strategy": strategy, key: 1}), f"lora[0].{key}", f"'{owner}'")


def test_expert_lora_bad_choice_gets_a_suggestion():
    d = {**ARC, "routing_strategy": "mixlora", "expert_lora": {"lora_init": "gausian", "use_dora": 1}}
    problems = problems_of(run_cfg(d))
    assert problems == [
        "lora[0].expert_lora.use_dora: expected true or false or null, got 1 (an integer)",
        "lora[0].expert_lora.lora_init: expected one of 'original', 'gaussian' or null, got \"gausian\" (a string); "
        "did you mean gaussian?",
    ]


def test_expert_lora_unknown_key_and_range():
    problems = problems_of(run_cfg({**ARC, "routing_strategy": "mixlora", "expert_lora": {"alpha": 3, "r": 0}}))
    assert "lora[0].expert_lora.alpha: unknown key; did you mean lora_alpha?" in problems
    assert any(p.startswith("lora[0].expert_lora.r: expected a value >= 1") for p in problems)
    assert len(problems) == 2


def test_duplicate_json_key_is_reported(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"lora": [{"name": "a", "task_name": "arc-e", "lr": 0.1, "lr": 0.2}]}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["lora[0].lr: given more than once; keep one"]


def test_missing_name_and_lora_list():
    one_problem(run_cfg({"task_name": "arc-e"}), "lora[0].name: missing")
    assert problems_of({"cutoff_len": 3}) == ["lora: missing; give a list of adapters"]
    one_problem({"lora": []}, "lora: needs at least one adapter")
    one_problem({"lora": {"name": "a"}}, "lora: expected a list of adapters, got an object")
    one_problem({"lora": [3]}, "lora[0]: expected an adapter object, got 3 (an integer)")


# --------------------------------------------------------------------------- type and range


@pytest.mark.parametrize(
    "key, value, fragments",
    [
        ("r", "8", ["lora[0].r: expected an integer >= 1", 'got "8" (a string)']),
        ("r", 8.5, ["lora[0].r: expected an integer >= 1", "got 8.5 (a number)"]),
        ("r", True, ["lora[0].r: expected an integer", "got true (a boolean)"]),
        ("lr", "3e-4", ["lora[0].lr: expected a number > 0", 'got "3e-4"']),
        ("use_dora", "true", ["lora[0].use_dora: expected true or false", 'got "true"']),
        ("optim", "adam", ["lora[0].optim: expected one of 'adamw', 'sgd'", "did you mean adamw?"]),
        ("scheduler_type", "cosin", ["lora[0].scheduler_type: expected one of", "did you mean cosine?"]),
        ("target_modules", "q_proj", ["lora[0].target_modules: expected a list of names", 'got "q_proj"']),
        ("target_modules", {"q_proj": "yes"}, ["lora[0].target_modules", "'q_proj' maps to \"yes\""]),
        ("data", 3, ["lora[0].data: expected a string or null", "got 3"]),
    ],
)
def test_wrong_type_names_key_expected_and_given(key, value, fragments):
    one_problem(run_cfg({**ARC, key: value}), *fragments)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("lr", 0, "lora[0].lr: expected a value > 0, got 0"),
        ("lr", -1e-4, "lora[0].lr: expected a value > 0"),
        ("lora_dropout", 1.0, "lora[0].lora_dropout: expected a value >= 0 and < 1, got 1.0"),
        ("lora_dropout", -0.1, "lora[0].lora_dropout: expected a value >= 0 and < 1"),
        ("r", 0, "lora[0].r: expected a value >= 1, got 0"),
        ("batch_size", 0, "lora[0].batch_size: expected a value >= 1"),
        ("warmup_ratio", 1.0, "lora[0].warmup_ratio: expected a value >= 0 and < 1"),
        ("loraplus_lr_ratio", 0, "lora[0].loraplus_lr_ratio: expected a value > 0"),
        ("max_grad_norm", -1, "lora[0].max_grad_norm: expected a value >= 0"),
    ],
)
def test_out_of_range_values(key, value, fragment):
    one_problem(run_cfg({**ARC, key: value}), fragment)


def test_lora_dropout_zero_is_allowed():
    assert adapter_from_dict({**ARC, "lora_dropout": 0}).lora_dropout == 0.0


def test_non_finite_number_is_rejected(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"lora": [{"name": "a", "task_name": "arc-e", "lr": NaN}]}')
    with pytest.raises(ConfigError, match=r"lora\[0\]\.lr: expected a number > 0, got NaN"):
        load_config(path)


@pytest.mark.parametrize("top_p, ok", [(0.0, False), (1.0, True), (1.01, False), (0.5, True)])
def test_top_p_range(top_p, ok):
    d = run_cfg({**ARC, "routing_strategy": "mixlora-dynamic", "top_p": top_p})
    if ok:
        assert config_from_dict(d).lora[0].top_p == top_p
    else:
        one_problem(d, "lora[0].top_p: expected a value > 0 and <= 1")


def test_run_level_ranges():
    one_problem(run_cfg(ARC, cutoff_len=0), "cutoff_len: expected a value >= 1")
    one_problem(run_cfg(ARC, train_strategy="fast"), "train_strategy: expected one of 'optim', 'none'")
    one_problem(run_cfg(ARC, train_lora_candidate_num=1, train_lora_simultaneously_num=3),
                "train_lora_simultaneously_num: 3 exceeds train_lora_candidate_num 1")  # fmt: skip


# ------------------------------------------------------------------------------ cross-field


def test_micro_batch_size_must_divide_batch_size():
    one_problem(run_cfg({**ARC, "batch_size": 16, "micro_batch_size": 5}), "micro_batch_size: 5 must divide batch_size 16")
    assert adapter_from_dict({**ARC, "batch_size": 16, "micro_batch_size": 4}).micro_batch_size == 4


def test_top_k_at_most_num_experts():
    d = {**ARC, "routing_strategy": "mixlora", "num_experts": 4}
    one_problem(run_cfg({**d, "top_k": 5}), "lora[0].top_k: 5 exceeds num_experts 4")
    assert config_from_dict(run_cfg({**d, "top_k": 4})).lora[0].top_k == 4


def test_switch_needs_positive_expert_capacity():
    d = {**ARC, "routing_strategy": "mixlora-switch"}
    one_problem(run_cfg({**d, "expert_capacity": 0}), "lora[0].expert_capacity", "needs expert_capacity > 0")
    assert config_from_dict(run_cfg({**d, "expert_capacity": 1})).lora[0].expert_capacity == 1


def test_adapter_names_unique_and_folder_safe():
    one_problem(run_cfg(ARC, {**ARC, "name": "A"}), "lora[1].name: 'A' is already used by lora[0]")
    for bad in ("a/b", "..", ".hidden", "_mlora", "-x", "has space", "", "x" * 101, "v1.", "caf\u00e9"):
        one_problem(run_cfg({**ARC, "name": bad}), "lora[0].name", "cannot be an adapter name")
    for good in ("arc_e-0.v2", "v1.0", "train", "eval", "to", "logs", "checkpoints"):
        assert adapter_from_dict({**ARC, "name": good}).name == good


def test_at_least_one_target_module():
    one_problem(run_cfg({**ARC, "target_modules": []}), "lora[0].target_modules: needs at least one target module")
    one_problem(run_cfg({**ARC, "target_modules": {"q_proj": False}}), "needs at least one target module")
    one_problem(run_cfg({**ARC, "target_modules": ["q_proj", "q_proj"]}), "lists q_proj more than once")


def test_optimizer_and_schedule_rules_leave_no_dead_keys():
    one_problem(run_cfg({**ARC, "momentum": 0.9}), "lora[0].momentum: used only with optim 'sgd'")
    assert adapter_from_dict({**ARC, "optim": "sgd", "momentum": 0.9}).momentum == 0.9
    one_problem(run_cfg({**ARC, "warmup_steps": 10}), "lora[0].scheduler_type: 'constant' has no warm-up")
    one_problem(run_cfg({**ARC, "warmup_steps": 10, "warmup_ratio": 0.1, "scheduler_type": "linear"}),
                "give warmup_steps or warmup_ratio, not both")  # fmt: skip
    assert adapter_from_dict({**ARC, "warmup_steps": 10, "scheduler_type": "constant_with_warmup"}).warmup_steps == 10


def test_task_rules():
    one_problem(run_cfg({**ARC, "task_name": "hellaswg"}), "lora[0].task_name: unknown task 'hellaswg'",
                "did you mean hellaswag?")  # fmt: skip
    one_problem(run_cfg({"name": "a", "task_name": "casual"}), "lora[0].data: task 'casual'", "needs a data source")
    one_problem(run_cfg({"name": "a", "task_name": "arc-e;boolq", "data": "only_one.json"}),
                "lora[0].data: gives 1 source(s) for 2 task(s)")  # fmt: skip
    one_problem(run_cfg({"name": "a", "task_name": "arc-e;arc-e"}), "lists the same task")
    ok = config_from_dict(run_cfg({"name": "a", "task_name": "casual;casual;boolq", "data": "x.json;y.json;"}))
    assert ok.lora[0].task_sources == [("casual", "x.json"), ("casual", "y.json"), ("boolq", None)]


def test_act_fn_is_checked():
    one_problem(run_cfg({**ARC, "routing_strategy": "mixlora", "act_fn": "selu"}), "lora[0].act_fn", "did you mean silu?")


def test_every_problem_is_reported_at_once_with_file_name():
    d = run_cfg(
        {**ARC, "lora_alfa": 16, "r": "8", "micro_batch_size": 5},
        {"name": "b", "task_name": "arc-e", "routing_strategy": "mixlora", "top_k": 9, "lr": 0},
        ARC,
        save_stp=1,
    )
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, source="runs/x.json")
    problems = info.value.problems
    expected = ["save_stp: unknown key", "lora[0].lora_alfa: unknown key", "lora[0].r: expected an integer",
                "lora[0].micro_batch_size: 5 must divide", "lora[1].lr: expected a value > 0",
                "lora[1].top_k: 9 exceeds num_experts 8", "lora[2].name: 'a' is already used by lora[0]"]  # fmt: skip
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), fragment
    lines = str(info.value).splitlines()
    assert len(lines) == len(expected) and all(line.startswith("runs/x.json: ") for line in lines)


def test_bad_value_is_not_reported_twice_by_a_rule():
    # micro_batch_size 0 fails its range; the divisibility rule must not run on it (or crash).
    one_problem(run_cfg({**ARC, "micro_batch_size": 0}), "lora[0].micro_batch_size: expected a value >= 1")


# ------------------------------------------------------------------------------------ files


def test_json_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "lora": [\n    {"name": "a",}\n  ]\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: line 3, column 18: invalid JSON: .+", str(info.value))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="file not found; create one with"):
        load_config(tmp_path / "none.json")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object with a 'lora' list"):
        load_config(tmp_path / "list.json")


# ----------------------------------------------------------------------------------- export


def test_to_dict_is_fully_resolved_and_round_trips():
    cfg = config_from_dict(run_cfg(
        {**ARC, "target_modules": {"q_proj": True}},
        {"name": "m", "task_name": "boolq", "routing_strategy": "mixlora-switch", "expert_lora": {"r": 4}},
        {"name": "d", "task_name": "piqa", "routing_strategy": "mixlora-dynamic", "use_dora": True},
    ))  # fmt: skip
    d = to_dict(cfg)
    json.dumps(d)  # JSON-ready
    assert set(d) == {f.name for f in dataclasses.fields(RunConfig)}
    assert set(d["lora"][0]) == {f.name for f in dataclasses.fields(LoraConfig)}
    switch, dynamic = d["lora"][1], d["lora"][2]
    assert {"expert_capacity", "router_z_loss_coef", "ffn_dropout"} <= set(switch)
    assert not {"top_k", "top_p", "temperature"} & set(switch)
    assert {"top_p", "temperature"} <= set(dynamic) and "top_k" not in dynamic
    assert switch["expert_lora"]["r"] == 4 and switch["expert_lora"]["lora_alpha"] is None
    assert config_from_dict(copy.deepcopy(d)) == cfg
    assert to_dict(cfg.lora[0]) == d["lora"][0]


def test_config_validation_does_not_import_torch():
    code = (
        "import sys\n"
        "from mlora.config import load_config\n"
        "import mlora.cli\n"
        f"load_config({str(REPO / 'templates' / 'mixlora.json')!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    keys = {f.name for cls in (RunConfig, MixLoraConfig, ExpertLoraConfig) for f in dataclasses.fields(cls)}
    documented = set(re.findall(r"^\| `([a-z_]+)`", readme, flags=re.M))
    assert keys - documented == set(), "keys missing from the README's config reference"
    assert documented - keys == set(), "README documents keys the config does not have"
