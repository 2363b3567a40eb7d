"""An adapter trains the same whatever shares its batch, with dropout and router jitter on.

The neighbour's examples are longer than any of the adapter's, so together the batch is
padded wider than alone: every random draw (dropout masks, jitter) must follow the
adapter's real tokens, not the padded grid (DESIGN.md section 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train.helpers import adapter, run_config, train, weights, write_template

# Questions of different lengths, so the adapter's own micro-batches are padded too.
SHORT = [("what is the sky", "blue"), ("what is the big red fire", "hot"), ("what is the tree", "green"),
         ("what is the sun in the day", "hot"), ("what is the moon", "night"), ("what is cold water", "cold"),
         ("what is the small cat and the big dog", "dog"), ("what is a fish", "water")]
# Every one longer than the longest of SHORT.
LONG = [(f"what is the {a} and the {b} and the {c} in the {d} with the {e}", b)
        for a, b, c, d, e in [("sky", "blue", "sun", "day", "rain"), ("cat", "dog", "bird", "tree", "fish"),
                              ("fire", "red", "water", "night", "moon"), ("big", "small", "fast", "rain", "sun"),
                              ("up", "down", "left", "day", "food"), ("eat", "food", "drink", "night", "cat")]]


def write_records(folder: Path, name: str, pairs) -> str:
    path = Path(folder) / name
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in pairs]))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path, "short.json", SHORT), write_records(tmp_path, "long.json", LONG)


def assert_same_weights(together: dict, alone: dict):
    assert set(together) == set(alone)
    for key, expected in alone.items():
        # Alone and together differ only in fp32 rounding (GEMMs of other shapes): 2e-7 at
        # most on weights of 0.25. Masks drawn over the padded grid moved them by 5e-2.
        torch.testing.assert_close(together[key], expected, rtol=1e-5, atol=5e-7)


@pytest.mark.parametrize("side", ["right", "left"])
def test_lora_and_mixlora_train_alone_as_beside_a_longer_neighbour(base_model, data, tmp_path, side):
    short, long = data
    template = write_template(tmp_path)
    # Plain SGD: Adam would blow fp32 rounding in near-zero gradient entries up to lr-sized steps.
    common = {"lora_dropout": 0.1, "expand_side": side, "prompt": template, "optim": "sgd", "lr": 0.5}
    lora = adapter("lora", short, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], **common)
    moe = adapter("moe", short, routing_strategy="mixlora", num_experts=3, top_k=2, jitter_noise=0.1,
                  target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], **common)
    # The neighbour pads on the other side and has dropout of its own.
    other = "left" if side == "right" else "right"
    neighbour = adapter("long", long, lora_dropout=0.2, expand_side=other, prompt=template, batch_size=2,
                        micro_batch_size=2, target_modules=["q_proj", "k_proj", "up_proj"])
    three = {"train_lora_candidate_num": 3, "train_lora_simultaneously_num": 3}
    together = train(run_config([neighbour, lora, moe], **three), base_model, tmp_path / "together")
    for name, cfg in (("lora", lora), ("moe", moe)):
        alone = train(run_config([cfg]), base_model, tmp_path / name)
        assert alone.adapters[name].steps == together.adapters[name].steps == 4
        assert_same_weights(weights(together.adapters[name].folder), weights(alone.adapters[name].folder))
