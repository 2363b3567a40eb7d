"""Per-adapter optimizers, learning-rate schedules and fp16 loss scaling.

Every adapter trains with its own optimizer and schedule, built from its own config:

* ``optim``: ``adamw`` (decoupled ``weight_decay``) or ``sgd`` (``momentum``, ``weight_decay``).
* LoRA+ (``loraplus_lr_ratio``): the B matrices and every vector parameter (the DoRA
  magnitude) form a second parameter group at ``lr * ratio``; A matrices and MixLoRA routers
  stay at ``lr``. With ratio 1 there is a single group.
* ``scheduler_type`` with ``warmup_steps`` or ``warmup_ratio`` (a fraction of all optimizer
  steps of the adapter), through transformers' ``get_scheduler``.

`loss_scaler` is a dynamic loss scale for one adapter (`torch.amp.GradScaler`). A mixed batch
sums the adapters' scaled losses before one backward; since adapters own disjoint parameters,
each adapter's gradients are exactly its own loss's gradients times its own scale, so every
adapter can be unscaled, checked for overflow and stepped (or skipped) on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlora.config import LoraConfig


def parameter_groups(params: dict[str, nn.Parameter], lr: float, loraplus_lr_ratio: float) -> list[dict]:
    """Split an adapter's parameters into optimizer groups.

    Args:
        params: ``key -> parameter`` as `MultiAdapterModel.adapter_parameters` returns them.
        lr: the adapter's learning rate.
        loraplus_lr_ratio: LoRA+ ratio; B matrices and vectors get ``lr * ratio``.
    Returns:
        One group (ratio 1) or two: ``[{"params", "lr", "name": "A"}, {..., "name": "B"}]``.
    """
    if loraplus_lr_ratio == 1.0:
        return [{"params": list(params.values()), "lr": lr, "name": "all"}]
    fast, slow = [], []
    for key, param in params.items():
        is_b = ".lora_B." in key or key.endswith("lora_B.weight") or param.dim() < 2
        (fast if is_b else slow).append(param)
    groups = [{"params": slow, "lr": lr, "name": "A"}, {"params": fast, "lr": lr * loraplus_lr_ratio, "name": "B"}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: LoraConfig, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer an adapter config asks for, over that adapter's parameters."""
    groups = parameter_groups(params, cfg.lr, cfg.loraplus_lr_ratio)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim must be 'adamw' or 'sgd', got {cfg.optim!r}")


def warmup_steps(cfg: LoraConfig, total_steps: int) -> int:
    """``warmup_steps``, or ``ceil(warmup_ratio * total_steps)`` when a ratio is given."""
    if cfg.warmup_ratio:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return cfg.warmup_steps


def build_scheduler(cfg: LoraConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule of an adapter over its ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(cfg.scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=max(total_steps, 1))


def loss_scaler(enabled: bool, device: torch.device) -> torch.amp.GradScaler:
    """One adapter's dynamic loss scale (fp16 bases): torch's own `GradScaler`, a no-op when
    disabled. Its optimizer is stepped through it (`scaler.step`), which skips a step whose
    gradients overflowed; `scaler.update` then backs the scale off, or grows it after
    `growth_interval` finite steps."""
    return torch.amp.GradScaler(device.type, enabled=enabled)
