"""Which rows of a batch belong to which adapter, shared by every wrapped module.

A mixed batch is laid out contiguously: rows ``[start, end)`` belong to one adapter.
The layout is set once per forward on the model's `AdapterContext`; every wrapped
projection and MixLoRA FFN reads it. It stays set after the forward, and the
gradient-checkpointing function (`checkpoint_fn`) captures it and puts it back while a
layer is recomputed during backward, so recomputation sees the same segments even when
another forward has run in between.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, end)`` of the batch use adapter `name`."""

    name: str
    start: int
    end: int


@dataclass
class BatchLayout:
    """The per-forward state every adapter layer reads.

    Attributes:
        segments: contiguous row ranges per adapter, ordered, non-overlapping. Rows that no
            segment covers get the base model's output.
        token_mask: ``(B, T)`` bool, True on real (non-padding) tokens, or None when the
            batch has no padding. MixLoRA layers compute their balance loss over these.
        router_logits: filled during the forward by MixLoRA layers: adapter name -> list of
            ``(logits (N, E) fp32, token mask (N,) bool | None)``, one entry per layer.
        record: MixLoRA layers append to `router_logits` only while True; it is switched
            off after the forward so recomputation under checkpointing does not append twice.
        generators: adapter name -> its own random stream for dropout masks and router
            jitter. With one stream per adapter, an adapter's masks do not depend on which
            adapters share its batch. Adapters without one use the global RNG.
    """

    segments: tuple[Segment, ...]
    token_mask: torch.Tensor | None = None
    router_logits: dict[str, list] = field(default_factory=dict)
    record: bool = True
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    @staticmethod
    def from_sizes(names_and_sizes, token_mask=None) -> "BatchLayout":
        """Lay out adapters in the given order: ``[("a", 2), ("b", 3)]`` -> a: [0,2), b: [2,5)."""
        segments, start = [], 0
        for name, size in names_and_sizes:
            segments.append(Segment(name, start, start + size))
            start += size
        return BatchLayout(tuple(segments), token_mask)


class AdapterContext:
    """Holds the current `BatchLayout` for one adapted model (one instance per model).

    When no layout is set, `default_adapter` (if any) applies to every row: that is how a
    model returned by the inference API behaves like a plain transformers model.
    """

    def __init__(self):
        self.layout: BatchLayout | None = None
        self.default_adapter: str | None = None

    def generator(self, name: str) -> torch.Generator | None:
        """Adapter `name`'s random stream in the current layout (None: the global RNG)."""
        return self.layout.generators.get(name) if self.layout is not None else None

    def segments(self, batch_size: int) -> tuple[Segment, ...]:
        if self.layout is not None:
            return self.layout.segments
        if self.default_adapter is not None:
            return (Segment(self.default_adapter, 0, batch_size),)
        return ()

    @contextlib.contextmanager
    def using(self, layout: BatchLayout | None):
        previous = self.layout
        self.layout = layout
        try:
            yield layout
        finally:
            self.layout = previous

    def checkpoint_fn(self, function, *args, **kwargs):
        """A drop-in for `torch.utils.checkpoint.checkpoint` that keeps the layout.

        The recomputation in backward runs `function` again; it must see the layout of
        the forward it replays, not whatever is current when backward runs.
        """
        layout = self.layout
        # torch restores the global RNG for the replay; the adapters' own streams too.
        states = {n: g.get_state() for n, g in layout.generators.items()} if layout is not None else {}

        def replay(*inner):
            for name, state in states.items():
                layout.generators[name].set_state(state)
            with self.using(layout):
                return function(*inner)

        kwargs.setdefault("use_reentrant", False)
        return checkpoint(replay, *args, **kwargs)
