"""Per-adapter optimizers: LoRA+ groups, schedules with warm-up, fp16 loss scaling."""

from __future__ import annotations

import math

import pytest
import torch

from mlora.config import LoraConfig
from mlora.model.adapted import MultiAdapterModel
from mlora.train.optim import build_optimizer, build_scheduler, parameter_groups, warmup_steps
from tests.tiny import tiny_model


def dora_params(**cfg):
    model = MultiAdapterModel(tiny_model())
    config = LoraConfig(name="d", task_name="arc-e", r=2, lora_alpha=4, use_dora=True,
                        target_modules=["q_proj", "down_proj"], **cfg)
    model.add_adapter(config, seed=0)
    return config, model.adapter_parameters("d")


def test_loraplus_puts_b_matrices_and_vectors_at_lr_times_ratio():
    cfg, params = dora_params(lr=1e-3, loraplus_lr_ratio=16.0)
    groups = {g["name"]: g for g in parameter_groups(params, cfg.lr, cfg.loraplus_lr_ratio)}
    slow = {id(p) for p in groups["A"]["params"]}
    fast = {id(p) for p in groups["B"]["params"]}
    for key, p in params.items():
        expected = fast if ("lora_B" in key or key.endswith("magnitude")) else slow
        assert id(p) in expected, key
    assert groups["A"]["lr"] == 1e-3 and groups["B"]["lr"] == pytest.approx(16e-3)
    assert len(slow) + len(fast) == len(params)
    assert len(parameter_groups(params, 1e-3, 1.0)) == 1


def test_optimizers_honour_their_settings():
    cfg, params = dora_params(optim="sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
    sgd = build_optimizer(cfg, params)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 0.01
    cfg, params = dora_params(optim="adamw", lr=0.1, weight_decay=0.05)
    adamw = build_optimizer(cfg, params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


def test_warmup_ratio_and_linear_schedule():
    cfg, params = dora_params(lr=1.0, scheduler_type="linear", warmup_ratio=0.25, loraplus_lr_ratio=2.0)
    assert warmup_steps(cfg, 8) == 2
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, 8)
    seen = []
    for _ in range(8):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # warm-up 0, 1/2, then linear decay (8 - t) / 6; the B group keeps its ratio.
    expected = [0.0, 0.5] + [(8 - t) / 6 for t in range(2, 8)]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert [s[1] for s in seen] == pytest.approx([2 * e for e in expected])


def test_cosine_schedule_with_warmup_steps():
    cfg, params = dora_params(lr=1.0, scheduler_type="cosine", warmup_steps=1)
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, 5)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0] + [0.5 * (1 + math.cos(math.pi * (t - 1) / 4)) for t in range(1, 5)])


class _Log:
    """Collects what `optimizer_step` logs."""

    def __init__(self):
        self.records = []

    def step(self, record):
        self.records.append(("step", record))

    def event(self, step, event, **details):
        self.records.append((event, details))


def _fp16_run(fp16: bool):
    from mlora.data import TokenizedExample
    from mlora.train.data import Prepared
    from mlora.train.state import AdapterRun

    cfg, params = dora_params(lr=0.1)
    examples = [TokenizedExample("casual", [1, 2, 3], [-100, 2, 3])] * 16
    return AdapterRun.create(cfg, 0, Prepared(examples, 16, 0, 0), params, fp16, _Log())


def test_loss_scaling_skips_an_overflowing_step_backs_off_then_steps():
    """fp16 bases: each adapter's loss scale is torch's GradScaler; an overflow skips the step
    (logged as such, not as a fault) and halves the scale; finite gradients are unscaled."""
    from mlora.train.trainer import optimizer_step

    ar = _fp16_run(fp16=True)
    ar.scaler.scale(torch.ones(()))  # the trainer scales each loss before the backward
    scale = ar.scaler.get_scale()
    before = {k: p.detach().clone() for k, p in ar.params.items()}
    for p in ar.params.values():
        p.grad = torch.full_like(p, float("inf"))
    optimizer_step(ar, epoch=0)
    assert ar.metrics.records[-1][0] == "fp16_overflow" and ar.nan_streak == 0
    assert ar.scaler.get_scale() == scale / 2
    assert all(torch.equal(p, before[k]) for k, p in ar.params.items())
    for p in ar.params.values():
        p.grad = torch.full_like(p, 1e-3) * ar.scaler.get_scale()  # a scaled gradient
    optimizer_step(ar, epoch=0)
    kind, record = ar.metrics.records[-1]
    unscaled = math.sqrt(sum(p.numel() for p in ar.params.values())) * 1e-3
    assert kind == "step" and record["grad_norm"] == pytest.approx(unscaled, rel=1e-4)
    assert not all(torch.equal(p, before[k]) for k, p in ar.params.items())


def test_without_loss_scaling_a_non_finite_gradient_is_a_fault():
    from mlora.train.trainer import optimizer_step

    ar = _fp16_run(fp16=False)
    for p in ar.params.values():
        p.grad = torch.full_like(p, float("nan"))
    optimizer_step(ar, epoch=0)
    assert ar.metrics.records[-1][0] == "nan_grad" and ar.nan_streak == 1
    assert not ar.scaler.is_enabled()
