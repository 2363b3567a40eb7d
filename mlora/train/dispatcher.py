"""Which adapters are loaded, and which of them share the next training step.

Adapters move ``waiting -> active -> done``. At most ``train_lora_candidate_num`` are active
(loaded on the model, optimizer state in memory); as one finishes, the next waiting adapter
(config order) is loaded. Each step takes one micro-batch from each of up to
``train_lora_simultaneously_num`` active adapters:

* ``train_strategy: none`` -- round robin: the first adapters of the turn order; those that
  trained go to its back.
* ``train_strategy: optim`` -- the adapter first in turn, plus the others whose next
  micro-batches pad least against it: a mixed batch is padded to its longest row, so adapters
  with similar lengths waste less compute. Since the first in turn always trains and then goes
  to the back, every adapter trains at least once every ``len(active)`` steps.

Every decision is a pure function of the `Dispatcher` state and the adapters' next
micro-batch sizes, so a resumed run makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlora.config import LoraConfig

if TYPE_CHECKING:
    from mlora.train.data import Prepared

# Beyond this many candidate subsets, `optim` picks greedily by length instead of exhaustively.
_MAX_SUBSETS = 5000

# Step time per token against LoRA's, for `adapter_cost`: MixLoRA 1.15x (docs/benchmarks.md, the
# medium shape in fp32); DoRA's per-step weight norms are not measured yet, 1.3x is an estimate.
METHOD_COST = {"lora": 1.0, "dora": 1.3, "mixlora": 1.15, "mixdora": 1.45}


@dataclass(frozen=True)
class Candidate:
    """An active adapter's next micro-batch: rows and the length of its longest row."""

    name: str
    rows: int
    max_len: int


@dataclass
class Dispatcher:
    """The queue of adapters and the step counter the choices are made against.

    Attributes:
        waiting: adapters not loaded yet, in config order.
        active: loaded adapters, in load order (the row order of a batch).
        turn: the active adapters, longest waiting first.
        step: global training steps done so far.
    """

    waiting: list[str]
    active: list[str] = field(default_factory=list)
    turn: list[str] = field(default_factory=list)
    step: int = 0

    def to_load(self, candidate_num: int) -> list[str]:
        """Move waiting adapters to active until `candidate_num` are active; returns those moved.

        A newly loaded adapter has waited since the run began: it goes to the front of the turn.
        """
        moved = []
        while self.waiting and len(self.active) + len(moved) < candidate_num:
            moved.append(self.waiting.pop(0))
        self.active += moved
        self.turn = moved + self.turn
        return moved

    def retire(self, name: str) -> None:
        """An active adapter is done (finished or stopped)."""
        self.active.remove(name)
        self.turn.remove(name)

    def choose(self, candidates: list[Candidate], n: int, strategy: str) -> list[str]:
        """The adapters of the next step, in row order (load order).

        Args:
            candidates: the active adapters' next micro-batches, in load order.
            n: ``train_lora_simultaneously_num``.
            strategy: ``"optim"`` or ``"none"``.
        """
        if not candidates:
            return []
        n = min(n, len(candidates))
        load_order = {c.name: i for i, c in enumerate(candidates)}
        by_wait = sorted(candidates, key=lambda c: self.turn.index(c.name))
        if strategy == "none" or n == len(candidates):
            chosen = by_wait[:n]
        else:
            anchor = by_wait[0]
            others = [c for c in candidates if c.name != anchor.name]
            chosen = [anchor, *_least_padding(anchor, others, n - 1)]
        return sorted((c.name for c in chosen), key=load_order.__getitem__)

    def record(self, names: list[str]) -> None:
        """`names` trained in the current step: they go to the back of the turn; next step."""
        self.turn = [n for n in self.turn if n not in names] + [n for n in self.turn if n in names]
        self.step += 1

    def state_dict(self) -> dict:
        return {"waiting": list(self.waiting), "active": list(self.active), "turn": list(self.turn),
                "step": self.step}

    @classmethod
    def from_state(cls, state: dict) -> Dispatcher:
        return cls(list(state["waiting"]), list(state["active"]), list(state["turn"]), int(state["step"]))


def padding_cost(chosen: list[Candidate]) -> int:
    """Padding tokens added by batching `chosen` together beyond each one's own padding."""
    width = max(c.max_len for c in chosen)
    return sum(c.rows * (width - c.max_len) for c in chosen)


def _least_padding(anchor: Candidate, others: list[Candidate], k: int) -> list[Candidate]:
    """The `k` of `others` that pad least together with `anchor` (first such set in load order)."""
    if k <= 0:
        return []
    count = 1
    for i in range(k):  # C(len(others), k) without overflow worries for small k
        count = count * (len(others) - i) // (i + 1)
    if count <= _MAX_SUBSETS:
        best = min(itertools.combinations(others, k), key=lambda s: padding_cost([anchor, *s]))
        return list(best)
    return sorted(others, key=lambda c: abs(c.max_len - anchor.max_len))[:k]


def adapter_cost(cfg: LoraConfig, prepared: Prepared) -> float:
    """The estimated training work of one adapter: tokens over all its epochs x its method's
    step cost per token (`METHOD_COST`). Balances adapters across processes (``parallelism:
    adapter``); a relative figure, not seconds."""
    method = ("mix" if cfg.is_moe else "") + ("dora" if cfg.use_dora else "lora")
    tokens = sum(len(e.input_ids) for e in prepared.examples)
    return float(tokens * cfg.num_epochs * METHOD_COST[method])
