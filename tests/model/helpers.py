"""Shared builders for the model tests."""

import torch

from mlora.config import LoraConfig


def lora_cfg(name, **kwargs):
    settings = dict(r=4, lora_alpha=8.0, lora_dropout=0.0, task_name="arc-c",
                    target_modules=["q_proj", "v_proj", "down_proj"])
    settings.update(kwargs)
    return LoraConfig(name=name, **settings)


def randomise_b(model, name, std=0.3, seed=0):
    """Give adapter `name` non-zero B matrices (a fresh adapter is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.adapter_parameters(name).items():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if key.endswith("magnitude"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
