"""An adapter's training data as the trainer consumes it: examples, epoch order, batches.

`load_examples` turns an adapter config into tokenized examples (through `mlora.data`).
`AdapterData` fixes the order in which they are seen: epoch ``e`` is a permutation drawn
from a `torch.Generator` seeded by ``(adapter seed, e)``, so the order depends on nothing but
the adapter's own seed and can be recomputed on resume from a `Position` alone. An epoch is
cut into optimizer batches of ``batch_size`` examples (the last one may be smaller), each
cut into micro-batches of ``micro_batch_size``.

`collate_mixed` pads the micro-batches of several adapters into one ``(B, T)`` batch whose
rows ``[start, end)`` belong to one adapter, each padded on its own ``expand_side``.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass

import torch

from mlora.config import LoraConfig
from mlora.data import (
    IGNORE_INDEX,
    TokenizedExample,
    TrainingExample,
    build_training_examples,
    pad_rows,
    tokenize_examples,
)
from mlora.errors import MloraError
from mlora.model.context import BatchLayout


class TrainError(MloraError):
    """A problem the user must fix before (or while) training; printed without a traceback."""


@dataclass
class Prepared:
    """An adapter's tokenized examples and what tokenization did to them (for the log)."""

    examples: list[TokenizedExample]
    num_raw: int
    num_truncated: int
    num_dropped: int


def read_examples(cfg: LoraConfig, seed: int = 0) -> list[TrainingExample]:
    """The adapter's `TrainingExample`s (text); raises `TrainError` when there are none."""
    examples = build_training_examples(cfg.task_name, cfg.data, cfg.protocol, cfg.prompt, seed=seed)
    if not examples:
        source = cfg.data if cfg.data is not None else f"the default source of {cfg.task_name}"
        raise TrainError(f"adapter {cfg.name!r}: the training data ({source}) holds no examples; "
                         "point \"data\" at a file with at least one record")
    return examples


def tokenize(cfg: LoraConfig, raw: list[TrainingExample], tokenizer, cutoff_len: int) -> Prepared:
    """Tokenize an adapter's examples with the run's ``cutoff_len``; raises `TrainError` if none survive."""
    out = tokenize_examples(tokenizer, raw, cutoff_len, train_on_inputs=cfg.train_on_inputs)
    if not out.examples:
        raise TrainError(f"adapter {cfg.name!r}: all {len(raw)} examples lost every target token to "
                         f"cutoff_len={cutoff_len}; raise cutoff_len in the config")
    return Prepared(out.examples, len(raw), out.num_truncated, out.num_dropped)


@dataclass(frozen=True)
class Position:
    """Where an adapter is in its data: epoch, optimizer batch in that epoch, micro-batch in that batch."""

    epoch: int = 0
    batch: int = 0
    micro: int = 0


def target_count(example: TokenizedExample) -> int:
    """Tokens that carry loss: labels after the first position (the causal shift drops position 0)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


class AdapterData:
    """The examples of one adapter and the deterministic order it trains on them.

    Attributes:
        steps_per_epoch: optimizer steps in one epoch, ``ceil(n / batch_size)``.
        total_steps: optimizer steps of the whole run, ``num_epochs * steps_per_epoch``.
    """

    def __init__(self, examples: list[TokenizedExample], *, batch_size: int, micro_batch_size: int,
                 num_epochs: int, group_by_length: bool, seed: int):
        self.examples = examples
        self.lengths = [len(e.input_ids) for e in examples]
        self.targets = [target_count(e) for e in examples]
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.num_epochs = num_epochs
        self.group_by_length = group_by_length
        self.seed = seed
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self.total_steps = num_epochs * self.steps_per_epoch
        self._order_cache: tuple[int, list[int]] | None = None
        self._fingerprint: str | None = None

    def order(self, epoch: int) -> list[int]:
        """Example indices of `epoch`: a seeded permutation; with ``group_by_length`` each
        mega-batch of 50 optimizer batches is sorted by length (longest first), as in
        transformers' length-grouped sampler, so batches hold similar lengths yet vary."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(len(self.examples), generator=gen).tolist()
        if self.group_by_length:
            mega = 50 * self.batch_size
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s:s + mega], key=lambda j: -self.lengths[j])]
        self._order_cache = (epoch, order)
        return order

    def batch_indices(self, pos: Position) -> list[int]:
        """Indices of the optimizer batch `pos` is in."""
        start = pos.batch * self.batch_size
        return self.order(pos.epoch)[start:start + self.batch_size]

    def micro_indices(self, pos: Position) -> list[int]:
        """Indices of the micro-batch at `pos`."""
        batch = self.batch_indices(pos)
        start = pos.micro * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    def micro_batches_in(self, pos: Position) -> int:
        return math.ceil(len(self.batch_indices(pos)) / self.micro_batch_size)

    def batch_targets(self, pos: Position) -> int:
        """Loss-carrying tokens of the whole optimizer batch (the denominator of its mean loss)."""
        return sum(self.targets[i] for i in self.batch_indices(pos))

    def advance(self, pos: Position) -> tuple[Position, bool]:
        """The position after the micro-batch at `pos`, and whether that completed its batch."""
        if pos.micro + 1 < self.micro_batches_in(pos):
            return Position(pos.epoch, pos.batch, pos.micro + 1), False
        if pos.batch + 1 < self.steps_per_epoch:
            return Position(pos.epoch, pos.batch + 1, 0), True
        return Position(pos.epoch + 1, 0, 0), True

    def finished(self, pos: Position) -> bool:
        return pos.epoch >= self.num_epochs

    def micro_batches_done(self, pos: Position) -> int:
        """Micro-batches trained before `pos` (for the progress bar)."""
        per_batch = math.ceil(self.batch_size / self.micro_batch_size)
        per_epoch = micro_batches_per_epoch(len(self.examples), self.batch_size, self.micro_batch_size)
        return pos.epoch * per_epoch + pos.batch * per_batch + pos.micro

    def fingerprint(self) -> str:
        """A digest of the token ids and labels, to refuse resuming on different data (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for e in self.examples:
                h.update(len(e.input_ids).to_bytes(4, "little"))
                h.update(array("q", e.input_ids).tobytes())
                h.update(array("q", e.labels).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def micro_batches_per_epoch(n: int, batch_size: int, micro_batch_size: int) -> int:
    """Micro-batches in one epoch of `n` examples (the last batch may be short)."""
    full, last = divmod(n, batch_size)
    return full * math.ceil(batch_size / micro_batch_size) + math.ceil(last / micro_batch_size)


def mix_seed(*values) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike `hash`)."""
    digest = hashlib.sha256(",".join(str(v) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def adapter_seed(run_seed: int, name: str) -> int:
    """The seed of adapter `name` (init, data order): it depends on the name, not on the
    adapter's place in the config, so an adapter trained alone or beside others starts alike."""
    return mix_seed(run_seed, name)


def seed_of(cfg: LoraConfig, run_seed: int) -> int:
    """The seed of an adapter's initial weights, dropout streams and data order: its own ``seed``
    key when set (so replicas given one seed train alike whatever their names), else derived
    from the run seed and its name (`adapter_seed`), as configs without the key always had."""
    return adapter_seed(run_seed, cfg.name) if cfg.seed is None else cfg.seed


def step_seed(run_seed: int, global_step: int) -> int:
    """The seed of the global RNG for one training step (dropout): reproducible on resume."""
    return mix_seed(run_seed, "step", global_step)


@dataclass
class MixedBatch:
    """One forward's worth of rows from several adapters.

    Attributes:
        input_ids / attention_mask / labels: ``(B, T)`` long; labels are -100 on padding
            and on tokens without loss.
        layout: rows ``[start, end)`` per adapter, in `names` order.
        names: the adapters, in row order.
        tokens: real (non-padding) tokens in the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    layout: BatchLayout
    names: list[str]
    tokens: int


def collate_mixed(parts: list[tuple[str, list[TokenizedExample], str]], pad_id: int) -> MixedBatch:
    """Pad several adapters' micro-batches into one batch.

    Args:
        parts: ``(adapter name, examples, padding side "left"|"right")`` per adapter, in the
            order their rows are laid out.
        pad_id: token id written into padding.
    Returns:
        A `MixedBatch` of width ``T`` = the longest example of any part.
    """
    examples = [e for _, part, _ in parts for e in part]
    sides = [side for _, part, side in parts for _ in part]
    ids, mask, _ = pad_rows([e.input_ids for e in examples], pad_id, sides)
    labels = pad_rows([e.labels for e in examples], IGNORE_INDEX, sides).values
    layout = BatchLayout.from_sizes([(name, len(part)) for name, part, _ in parts])
    return MixedBatch(ids, mask.long(), labels, layout, [name for name, _, _ in parts], int(mask.sum()))
