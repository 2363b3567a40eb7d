"""Batched multi-adapter generation: each row gives what transformers' generate() gives for its
adapter alone (the inference API, one adapter, no neighbours), rows stop on their own, sampling
follows the seed, and the recorded routing is the top-k of router logits computed here from the
saved router weights and the hidden states of a plain forward over the finished sequence."""

import pytest
import torch
from safetensors.torch import load_file

from mlora import MixLoraModelForCausalLM
from mlora.config import ExpertLoraConfig
from mlora.io import load_adapter, save_adapter
from mlora.model.adapted import MultiAdapterModel, decoder_layers
from mlora.model.generation import GenerationError, GenerationSettings, generate, generate_rows
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import ARCHITECTURES, save_tiny, tiny_model, word_tokenizer

ADAPTERS = {
    "lora": lora_cfg("lora"),
    "dora": lora_cfg("dora", use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    "moe": moe_cfg("moe", router_init_range=1.0),
    "mixdora": moe_cfg("mixdora", use_dora=True, router_init_range=1.0),
    "switch": moe_cfg("switch", "switch", router_init_range=1.0),  # capacity 2: the prompt overflows
    # Capacity is counted per forward, so a plain forward over a whole answer routes it otherwise
    # than generation step by step; with room for every token the two agree.
    "switch_roomy": moe_cfg("switch_roomy", "switch", router_init_range=1.0, expert_capacity=64),
    "dynamic": moe_cfg("dynamic", "dynamic", router_init_range=1.0),
    "sparse": moe_cfg("sparse", router_init_range=1.0, sparse_step=2,
                      expert_lora=ExpertLoraConfig(r=2, lora_alpha=4.0)),
}
SHORT, LONG = "what is the cat ?", "the dog is big and the cat is small . what is the sky ?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    out = {"base": save_tiny(tiny_model(), word_tokenizer(), tmp / "base")}
    for name, cfg in ADAPTERS.items():
        model = MultiAdapterModel(tiny_model())
        model.add_adapter(cfg, seed=1)
        randomise_b(model, name, std=1.0)
        out[name] = save_adapter(model, name, tmp / name, base_model_name_or_path=out["base"])
    return out


@pytest.fixture(scope="module")
def served(folders):
    """One base model carrying every adapter."""
    model = MultiAdapterModel(tiny_model())
    for name in ADAPTERS:
        load_adapter(model, folders[name])
    return model.eval()


def ids(text):
    return word_tokenizer()(text).input_ids


def alone(folders, name, prompt, max_new_tokens, **kwargs):
    """transformers' generate() on the adapter loaded alone through the inference API (the reference)."""
    model = tiny_model() if name is None else MixLoraModelForCausalLM.from_pretrained(str(folders[name]))[0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                         **kwargs)
    return out[0, len(prompt):].tolist()


def test_greedy_rows_equal_each_adapter_alone(folders, served):
    # Prompts of two lengths (left padding), every adapter type, the base model in the middle.
    rows = ["lora", "moe", None, "dora", "mixdora", "switch", "dynamic", "sparse"]
    prompts = [ids(LONG if i % 2 else SHORT) for i in range(len(rows))]
    states = generate(served, prompts, rows, GenerationSettings(max_new_tokens=10), eos_token_id=None)
    for name, prompt, state in zip(rows, prompts, states):
        assert state.adapter == name and state.finished
        assert state.tokens == alone(folders, name, prompt, 10), name
    assert len({tuple(s.tokens) for s in states}) == len(rows)  # every adapter really answers differently


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
def test_greedy_rows_equal_generate_on_other_architectures(arch):
    # The reference: generate() of the same model applying one adapter to every row, as the
    # inference API's model does (its context's default adapter), with no padding and no neighbour.
    model = MultiAdapterModel(tiny_model(arch)).eval()
    for name, cfg in [("lora", lora_cfg("lora")), ("moe", moe_cfg("moe", router_init_range=1.0))]:
        model.add_adapter(cfg, seed=1)
        randomise_b(model, name, std=1.0)
    rows, prompts = ["lora", "moe", None], [ids(LONG), ids(SHORT), ids(SHORT)]
    states = generate(model, prompts, rows, GenerationSettings(max_new_tokens=8), eos_token_id=None)
    for name, prompt, state in zip(rows, prompts, states):
        model.context.default_adapter = name
        out = model.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert state.tokens == out[0, len(prompt):].tolist(), name
    model.context.default_adapter = None


def test_rows_stop_at_their_own_end_of_sequence(folders, served):
    # Each row's "end of sequence" is a token that adapter emits early, at a different step per row:
    # finished rows leave the batch (and the cache) while the others go on.
    rows, prompt = ["lora", "moe", None], ids(SHORT)
    free = {name: alone(folders, name, prompt, 12) for name in rows}
    stops = [free["lora"][2], free["moe"][5]]
    steps = list(generate_rows(served, [prompt] * 3, rows, GenerationSettings(max_new_tokens=12), eos_token_id=stops))
    for name, state in zip(rows, steps[-1]):
        assert state.tokens == alone(folders, name, prompt, 12, eos_token_id=stops), name
    ends = {name: len(state.tokens) for name, state in zip(rows, steps[-1])}
    assert ends["lora"] < 12 and ends["moe"] < 12 and ends["lora"] != ends["moe"]
    assert len(steps) == max(ends.values())


def test_streaming_adds_one_token_per_unfinished_row_per_step(served):
    prompt = ids(SHORT)
    lengths = [[len(s.tokens) for s in states]
               for states in generate_rows(served, [prompt] * 2, ["moe", "lora"], GenerationSettings(max_new_tokens=5),
                                           eos_token_id=None)]
    assert lengths == [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]


def test_sampling_follows_the_seed_whatever_the_neighbours(served):
    prompt = ids(SHORT)
    hot = GenerationSettings(max_new_tokens=10, temperature=1.5, seed=3)

    def sample(rows, settings=hot):
        return [s.tokens for s in generate(served, [prompt] * len(rows), rows, settings, eos_token_id=None)]

    both = sample(["lora", "moe"])
    assert both == sample(["lora", "moe"])
    assert sample(["moe"])[0] == both[1] and sample([None, "lora", "dynamic"])[1] == both[0]
    others = {tuple(sample(["lora"], GenerationSettings(max_new_tokens=10, temperature=1.5, seed=s))[0])
              for s in range(4, 8)}
    assert len(others | {tuple(both[0])}) > 1
    # A nucleus this small holds the most probable token only: sampling becomes greedy.
    narrow = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5)
    assert sample(["lora", "moe"], narrow) == sample(["lora", "moe"], GenerationSettings(max_new_tokens=10))


def router_logits_by_hand(folders, name, sequence):
    """Per decoder layer with experts: ``(T, E)`` router logits of every position of `sequence`, from the
    FFN inputs of a plain forward (no cache, no batch) and the router weights read from the file."""
    model, cfg = MixLoraModelForCausalLM.from_pretrained(str(folders[name]))
    weights = load_file(str(folders[name] / "adapter_model.safetensors"))
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0][0]))
             for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        model(torch.tensor([sequence]))
    for hook in hooks:
        hook.remove()
    return {i: inputs[i].float() @ weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"].float().T
            for i in sorted(inputs) if f"mixlora.layers.{i}.mlp.moe_gate.weight" in weights}, cfg


def expected_experts(logits, cfg):
    """The experts a token goes to, most probable first, from its router logits ``(E,)``."""
    probs = torch.softmax(logits, -1)
    ranked = probs.argsort(descending=True).tolist()
    if cfg.routing_strategy == "mixlora":
        return ranked[:cfg.top_k]
    if cfg.routing_strategy == "mixlora-switch":
        return ranked[:1]
    kept, mass = [], 0.0  # dynamic: the smallest set whose mass reaches top_p
    for e in ranked:
        kept.append(e)
        mass += float(probs[e])
        if mass >= cfg.top_p:
            return kept
    return kept


@pytest.mark.parametrize("name", ["moe", "mixdora", "switch_roomy", "dynamic", "sparse"])
def test_routing_is_the_top_k_of_each_tokens_router_logits(folders, served, name):
    prompt = ids(LONG)
    rows = ["lora", name, None]
    state = generate(served, [ids(SHORT), prompt, ids(SHORT)], rows, GenerationSettings(max_new_tokens=8),
                     eos_token_id=None)[1]
    assert len(state.routing) == len(state.tokens) == 8
    logits, cfg = router_logits_by_hand(folders, name, prompt + state.tokens[:-1])
    assert state.routing[0].layers == tuple(logits) == ((0,) if name == "sparse" else (0, 1))
    for t, step in enumerate(state.routing):
        position = len(prompt) - 1 + t  # the position that predicted generated token t
        expected = [expected_experts(logits[layer][position], cfg) for layer in step.layers]
        assert step.experts() == expected, (t, step.experts(), expected)
        torch.testing.assert_close(step.probs, torch.stack([torch.softmax(logits[layer][position], -1)
                                                            for layer in step.layers]), atol=1e-5, rtol=1e-5)
    assert generate(served, [prompt], ["lora"], GenerationSettings(max_new_tokens=3), eos_token_id=None)[0].routing == []


@pytest.mark.parametrize("settings, message", [
    (GenerationSettings(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (GenerationSettings(temperature=-1.0), "temperature must be >= 0"),
    (GenerationSettings(top_p=0.0), "top_p must be in (0, 1]"),
    (GenerationSettings(seed=-2), "seed must be an integer >= 0"),
])
def test_bad_settings_are_refused(served, settings, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        generate(served, [ids(SHORT)], ["lora"], settings, eos_token_id=None)


def test_unknown_adapter_empty_prompt_and_training_mode_are_refused(served):
    with pytest.raises(GenerationError, match=r"adapter\(s\) \['nope'\] are not loaded"):
        generate(served, [ids(SHORT)], ["nope"], eos_token_id=None)
    with pytest.raises(GenerationError, match="a prompt is empty"):
        generate(served, [[]], ["lora"], eos_token_id=None)
    try:
        with pytest.raises(GenerationError, match=r"training mode .* call model.eval\(\) first"):
            generate(served.train(), [ids(SHORT)], ["lora"], eos_token_id=None)
    finally:
        served.eval()
