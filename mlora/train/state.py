"""`AdapterRun`: everything one adapter carries while it trains, and its checkpoint form.

An adapter's training is fully described by its config, its seed, its data position, its
optimizer / scheduler / loss-scale state and, mid-accumulation, its partial gradients. That
is exactly what `state_dict` saves and `load_state_dict` restores, so a resumed adapter
continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mlora.config import LoraConfig, to_dict
from mlora.train.data import AdapterData, Position, Prepared, TrainError
from mlora.train.metrics import MetricsLog
from mlora.train.optim import build_optimizer, build_scheduler, loss_scaler


@dataclass
class AdapterRun:
    """One active adapter's training state.

    Attributes:
        step: optimizer batches consumed (stepped or skipped); the scheduler follows it.
        position: the next micro-batch to train on.
        nan_streak: consecutive batches skipped for a non-finite loss or gradient.
        accum_*: sums over the micro-batches of the current optimizer batch (for the log);
            ``accum_bad`` marks a batch with a non-finite loss, whose step is skipped.
    """

    cfg: LoraConfig
    seed: int
    data: AdapterData
    prepared: Prepared
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    metrics: MetricsLog
    position: Position = field(default_factory=Position)
    step: int = 0
    nan_streak: int = 0
    accum_loss: float = 0.0
    accum_aux: float = 0.0
    accum_tokens: int = 0
    accum_bad: bool = False
    last_loss: float | None = None
    clock: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        return self.cfg.name

    @classmethod
    def create(cls, cfg: LoraConfig, seed: int, prepared: Prepared, params: dict[str, nn.Parameter],
               fp16: bool, metrics: MetricsLog) -> AdapterRun:
        """A fresh run for an adapter already added to the model (its `params`)."""
        data = AdapterData(prepared.examples, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                           num_epochs=cfg.num_epochs, group_by_length=cfg.group_by_length, seed=seed)
        optimizer = build_optimizer(cfg, params)
        scheduler = build_scheduler(cfg, optimizer, data.total_steps)
        scaler = loss_scaler(fp16, next(iter(params.values())).device)
        return cls(cfg, seed, data, prepared, params, optimizer, scheduler, scaler, metrics)

    def next_examples(self) -> list:
        """The tokenized examples of the next micro-batch."""
        return self.examples_at(self.position)

    def examples_at(self, pos: Position) -> list:
        """The tokenized examples of the micro-batch at `pos`."""
        return [self.data.examples[i] for i in self.data.micro_indices(pos)]

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def reset_accumulation(self) -> None:
        self.accum_loss, self.accum_aux, self.accum_tokens, self.accum_bad = 0.0, 0.0, 0, False

    # ------------------------------------------------------------------ checkpoint form
    def state_dict(self) -> dict:
        grads = {}
        if self.position.micro > 0:  # mid-accumulation: the partial gradients are state too
            grads = {k: p.grad.detach().cpu().clone() for k, p in self.params.items() if p.grad is not None}
        return {
            "format": 1,
            "config": to_dict(self.cfg),
            "seed": self.seed,
            "data_fingerprint": self.data.fingerprint(),
            "position": dataclasses.asdict(self.position),
            "step": self.step,
            "nan_streak": self.nan_streak,
            "accumulation": {"loss": self.accum_loss, "aux": self.accum_aux, "tokens": self.accum_tokens,
                             "bad": self.accum_bad},
            "last_loss": self.last_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "grads": grads,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpointed state; refuses data or shape-relevant config changes."""
        if state["data_fingerprint"] != self.data.fingerprint():
            raise TrainError(f"adapter {self.name!r}: its training data (or cutoff_len / tokenizer) changed since "
                             "the checkpoint; resume with the same data, or start over with --overwrite")
        changed = _changed_keys(state["config"], to_dict(self.cfg))
        if changed:
            raise TrainError(f"adapter {self.name!r}: {', '.join(changed)} changed since the checkpoint; "
                             "resume with the config it was started with, or start over with --overwrite")
        if state["seed"] != self.seed:
            raise TrainError(f"adapter {self.name!r}: the checkpoint was trained with another seed")
        self.position = Position(**state["position"])
        self.step = state["step"]
        self.nan_streak = state["nan_streak"]
        accum = state["accumulation"]
        self.accum_loss, self.accum_aux = accum["loss"], accum["aux"]
        self.accum_tokens, self.accum_bad = accum["tokens"], accum["bad"]
        self.last_loss = state["last_loss"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key, grad in state["grads"].items():
            param = self.params[key]
            param.grad = grad.to(device=param.device, dtype=param.dtype)


# Keys that may change between a run and its resume without changing what the adapter learns
# so far (the schedule of later evaluation, for instance).
_FREE_KEYS = {"evaluate_steps", "evaluate_batch_size"}


def _changed_keys(saved: dict, current: dict) -> list[str]:
    keys = sorted((set(saved) | set(current)) - _FREE_KEYS)
    return [k for k in keys if saved.get(k) != current.get(k)]
