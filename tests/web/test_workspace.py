"""The web UI's workspace: one base with every adapter named (folders, a run's output folder), the
answers of the batched generation, and a clear message for each kind of bad input."""

import json

import pytest
import torch

from mlora import MixLoraModelForCausalLM
from mlora.data.casual import ALPACA
from mlora.hub import AdapterNotFoundError
from mlora.io import save_adapter
from mlora.model.adapted import MultiAdapterModel
from mlora.model.generation import GenerationSettings
from mlora.web.page import routing_html
from mlora.web.workspace import BASE, WebUIError, load_workspace
from tests.hub_cache import offline_hub, publish
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer


def save(cfg, folder, base, model=None):
    model = model or MultiAdapterModel(tiny_model())
    model.add_adapter(cfg, seed=1)
    randomise_b(model, cfg.name, std=1.0)
    return save_adapter(model, cfg.name, folder, base_model_name_or_path=base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run's output folder: three adapters, the run's bookkeeping, and a stray file."""
    tmp = tmp_path_factory.mktemp("web")
    base = save_tiny(tiny_model(), word_tokenizer(), tmp / "base")
    out = tmp / "output"
    save(lora_cfg("lora_0"), out / "lora_0", base)
    save(moe_cfg("mixlora_1", router_init_range=1.0), out / "mixlora_1", base)
    save(lora_cfg("dora_2", use_dora=True), out / "dora_2", base)
    # The run's bookkeeping is never served, even when a checkpoint there looks like an adapter.
    save(lora_cfg("ckpt"), out / "_mlora", base)
    (out / "notes.txt").write_text("mine")
    return {"tmp": tmp, "base": base, "out": out}


@pytest.fixture(scope="module")
def workspace(run):
    return load_workspace([str(run["out"])])


def test_a_run_folder_serves_every_adapter_on_one_base(run, workspace):
    assert list(workspace.adapters) == ["dora_2", "lora_0", "mixlora_1"]
    assert workspace.choices == [BASE, "dora_2", "lora_0", "mixlora_1"]
    assert [a.kind for a in workspace.adapters.values()] == ["DoRA", "LoRA", "MixLoRA"]
    assert workspace.base_model == run["base"]
    assert set(workspace.model.configs) == set(workspace.adapters)  # one MultiAdapterModel


def test_answers_are_each_adapters_own(run, workspace):
    # Each panel's text is what transformers' generate() makes of the same prompt with that adapter alone.
    steps = list(workspace.answer("what is the cat ?", None, ["mixlora_1", BASE, "lora_0"],
                                  GenerationSettings(max_new_tokens=6)))
    final = steps[-1]
    assert [p.name for p in final] == ["mixlora_1", BASE, "lora_0"] and all(p.finished for p in final)
    tokenizer = word_tokenizer()
    prompt = workspace.prompt_ids("what is the cat ?")
    assert prompt == tokenizer(ALPACA.render("what is the cat ?")).input_ids
    for panel in final:
        model = tiny_model() if panel.name == BASE else MixLoraModelForCausalLM.from_pretrained(
            str(run["out"] / panel.name))[0]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert panel.text == tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True), panel.name
        assert len(panel.tokens) == 6 and " ".join(panel.tokens) == panel.text
    assert len(final[0].routing) == 6 and final[1].routing == [] and final[2].routing == []
    assert [len(p.tokens) for p in steps[0]] == [1, 1, 1]  # streamed: one token per step


def test_routing_view_lists_each_tokens_experts(workspace):
    final = list(workspace.answer("what is the cat ?", "the dog", ["mixlora_1"], GenerationSettings(max_new_tokens=4)))[-1]
    panel = final[0]
    page = routing_html(panel)
    assert 'data-adapter="mixlora_1"' in page
    for step in panel.routing:
        for experts in step.experts():
            assert len(experts) == 2  # top-2
            assert f'data-experts="{experts[0]},{experts[1]}"' in page
    assert page.count("<td data-experts=") == 4 * 2  # tokens x layers
    assert '<table class="mlora-route-load">' in page


def test_bad_requests_say_what_to_do(workspace):
    settings = GenerationSettings(max_new_tokens=2)
    with pytest.raises(WebUIError, match="type an instruction first"):
        next(workspace.answer("  \n", None, [BASE], settings))
    with pytest.raises(WebUIError, match="choose at least one adapter"):
        next(workspace.answer("hi", None, [], settings))
    with pytest.raises(WebUIError, match=r"unknown adapter\(s\) \['nope'\]"):
        next(workspace.answer("hi", None, ["nope"], settings))


def test_names_stay_unique_and_base_is_reserved(run, tmp_path):
    other = tmp_path / "other"
    save(lora_cfg("lora_0"), other / "lora_0", run["base"])
    save(lora_cfg("base"), other / "base", run["base"])
    ws = load_workspace([str(run["out"] / "lora_0"), str(other / "lora_0"), str(other / "base")])
    assert list(ws.adapters) == ["lora_0", "lora_0-2", "base-2"]


def test_the_base_model_comes_from_the_configs_or_the_flag(run, tmp_path):
    elsewhere = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "elsewhere")
    moved = save(lora_cfg("moved"), tmp_path / "moved", elsewhere)
    with pytest.raises(WebUIError, match=r"trained on different base models: lora_0 names '.*base', moved names "
                                         r"'.*elsewhere'.*pass --base_model"):
        load_workspace([str(run["out"] / "lora_0"), str(moved)])
    ws = load_workspace([str(run["out"] / "lora_0"), str(moved)], base_model=elsewhere)
    assert ws.base_model == elsewhere and list(ws.adapters) == ["lora_0", "moved"]
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(WebUIError, match="moved .* names no base model in its adapter_config.json; pass --base_model"):
        load_workspace([str(moved)])


def test_an_adapter_for_another_base_is_named(run, tmp_path):
    wide = save_tiny(tiny_model(hidden=64), word_tokenizer(), tmp_path / "wide")
    folder = save(lora_cfg("wide_lora"), tmp_path / "wide_lora", wide, MultiAdapterModel(tiny_model(hidden=64)))
    with pytest.raises(WebUIError) as err:
        load_workspace([str(run["out"] / "lora_0"), str(folder)], base_model=run["base"])
    assert f"adapter wide_lora ({folder}) cannot be applied to base model {run['base']} (its config names {wide})" \
        in str(err.value)
    assert "has shape" in str(err.value)


def test_missing_and_empty_folders(run, tmp_path):
    with pytest.raises(AdapterNotFoundError, match=f"adapter folder {tmp_path}/nope does not exist"):
        load_workspace([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(WebUIError, match="empty holds no adapter_config.json, and none of its sub-folders does"):
        load_workspace([str(tmp_path / "empty")])


def test_the_mixlora_readme_line_loads_hub_ids(run, tmp_path, monkeypatch, no_network):
    # The seed's line: base and adapter named by hub ids (served from a local hub cache), m-LoRA's template path.
    hf_home = offline_hub(monkeypatch, tmp_path / "hf")
    publish(hf_home, "owner/tiny-base", run["base"])
    publish(hf_home, "owner/mixlora-tiny", run["out"] / "mixlora_1")
    monkeypatch.chdir(tmp_path)
    ws = load_workspace(["owner/mixlora-tiny"], base_model="owner/tiny-base", template="template/alpaca.json")
    assert list(ws.adapters) == ["mixlora-tiny"] and ws.adapters["mixlora-tiny"].kind == "MixLoRA"
    assert ws.base_model == "owner/tiny-base"
    assert no_network == []  # served from the hand-built cache alone
