"""Per-adapter optimizers, learning-rate schedules and fp16 loss scaling.

Every adapter trains with its own optimizer and schedule, built from its own config:

* ``optim``: ``adamw`` (decoupled ``weight_decay``) or ``sgd`` (``momentum``, ``weight_decay``).
* LoRA+ (``loraplus_lr_ratio``): the B matrices and every vector parameter (the DoRA
  magnitude) form a second parameter group at ``lr * ratio``; A matrices and MixLoRA routers
  stay at ``lr``. With ratio 1 there is a single group.
* ``scheduler_type`` with ``warmup_steps`` or ``warmup_ratio`` (a fraction of all optimizer
  steps of the adapter), through transformers' ``get_scheduler``.

`LossScaler` is a dynamic loss scale for one adapter. A mixed batch sums the adapters'
losses before one backward; since adapters own disjoint parameters, each adapter's
gradients are exactly its own loss's gradients times its own scale, so every adapter can be
unscaled, checked for overflow and stepped (or skipped) on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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


def build_optimizer(cfg, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer an adapter config asks for, over that adapter's parameters."""
    groups = parameter_groups(params, cfg.lr, cfg.loraplus_lr_ratio)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim must be 'adamw' or 'sgd', got {cfg.optim!r}")


def warmup_steps(cfg, total_steps: int) -> int:
    """``warmup_steps``, or ``ceil(warmup_ratio * total_steps)`` when a ratio is given."""
    if cfg.warmup_ratio:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return cfg.warmup_steps


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule of an adapter over its ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(cfg.scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=max(total_steps, 1))


class LossScaler:
    """Dynamic loss scaling for one adapter (fp16 bases); a no-op when disabled.

    The adapter's loss is multiplied by `scale` before the shared backward; `unscale_and_check`
    divides its gradients back and says whether they are finite. An overflow halves the
    scale (the step is skipped); `growth_interval` finite steps in a row double it.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def unscale_and_check(self, params: list[nn.Parameter]) -> bool:
        """Divide the gradients by the scale in place; True when all of them are finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled:
            return True
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def update(self, finite: bool) -> None:
        """Back off after an overflow, grow after `growth_interval` finite steps."""
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale * 0.5, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        self.enabled = state["enabled"]
        self.scale = state["scale"]
        self.good_steps = state["good_steps"]
        self.growth_interval = state["growth_interval"]
