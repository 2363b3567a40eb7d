"""The batch layout is a value passed into one forward: scoped to that call, replayed by checkpointing."""

import dataclasses

import pytest
import torch

from mlora.model.adapted import MultiAdapterModel
from mlora.model.context import BatchLayout
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import tiny_model

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def model_with_adapters():
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(lora_cfg("l", lora_dropout=0.2), seed=0)
    model.add_adapter(moe_cfg("m", lora_dropout=0.2, jitter_noise=0.1, target_modules=TARGETS), seed=1)
    randomise_b(model, "l")
    randomise_b(model, "m", seed=1)
    return model


def batch(seed=0):
    ids = torch.randint(4, 90, (4, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    return ids, mask


def layout(seed=3):
    return BatchLayout.from_sizes([("l", 2), ("m", 2)],
                                  generators={n: torch.Generator().manual_seed(seed + i) for i, n in enumerate("lm")})


def test_the_layout_is_a_value_and_leaves_nothing_behind():
    model = model_with_adapters()
    ids, mask = batch()
    lay = layout()
    out = model(ids, mask, lay)
    assert lay.token_mask is None  # the forward used the attention mask without changing the value
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.token_mask = mask.bool()
    assert [len(out.router_logits["m"])] == [2] and set(out.router_logits) == {"m"}
    # After the call no layout is installed: the transformers model alone is the bare base.
    plain = tiny_model()
    assert torch.equal(model.model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    # Each forward returns its own router logits; the earlier output is untouched.
    again = model(ids, mask, layout())
    assert len(again.router_logits["m"]) == 2 and len(out.router_logits["m"]) == 2


def test_checkpointed_recomputation_replays_the_forward_scope():
    """Dropout, jitter and padding on: the recomputation must see the same layout and streams."""
    ids, mask = batch()
    runs = []
    for checkpointed in (False, True):
        model = model_with_adapters()
        model.train()
        if checkpointed:
            model.enable_gradient_checkpointing()
        out = model(ids, mask, layout())
        # Another forward, with another layout and its own padding, runs before backward.
        other_ids, other_mask = batch(seed=1)
        model(other_ids[:1], other_mask[:1], BatchLayout.from_sizes([("m", 1)]))
        out.logits.square().mean().backward()
        grads = {k: p.grad.clone() for n in ("l", "m") for k, p in model.adapter_parameters(n).items()}
        runs.append((out, grads))
    (plain, plain_grads), (ckpt, ckpt_grads) = runs
    torch.testing.assert_close(ckpt.logits, plain.logits)
    assert len(ckpt.router_logits["m"]) == 2  # recorded once per layer, not again by the recomputation
    assert set(ckpt_grads) == set(plain_grads)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, rtol=1e-5, atol=1e-6)
