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


@dataclass(frozen=True)
class RealTokens:
    """A segment's real (non-padding) tokens, its ``rows x T`` grid flattened row by row.

    Random draws (dropout masks, router jitter) are made for these tokens only, in this
    order, and put at their positions. Row-major order of the real tokens is the same
    whatever the batch's padded width T (set by the longest row of any adapter) and padding
    side, so a real token gets the same draw alone and beside any other segment.

    Attributes:
        mask: ``(N,)`` bool, True on real tokens.
        index: ``(n,)`` long, the positions of the True entries, ascending.
    """

    mask: torch.Tensor
    index: torch.Tensor


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
            jitter. With one stream per adapter, drawn over each segment's real tokens only
            (`real_tokens`), an adapter's masks do not depend on which adapters share its
            batch. Adapters without one use the global RNG.
    """

    segments: tuple[Segment, ...]
    token_mask: torch.Tensor | None = None
    router_logits: dict[str, list] = field(default_factory=dict)
    record: bool = True
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    _real: dict = field(default_factory=dict, repr=False, compare=False)

    def real_tokens(self, seg: Segment, tokens_per_row: int) -> RealTokens | None:
        """The real tokens of `seg`, whose rows hold `tokens_per_row` tokens each.

        None when every token of the segment is real (no `token_mask`, or no padding in its
        rows): draws then cover the whole segment, the same as over its real tokens. Also
        None for rows of another width than `token_mask` (no token grid to map them to).
        Computed once per segment and layout (a host sync on GPU), reused by every layer and
        by the recomputation under gradient checkpointing.
        """
        if self.token_mask is None or self.token_mask.shape[1] != tokens_per_row:
            return None
        if seg not in self._real:
            mask = self.token_mask[seg.start:seg.end].reshape(-1).bool()
            self._real[seg] = None if bool(mask.all()) else RealTokens(mask, mask.nonzero().squeeze(1))
        return self._real[seg]

    @staticmethod
    def from_sizes(names_and_sizes, token_mask=None) -> BatchLayout:
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

    def real_tokens(self, seg: Segment, tokens_per_row: int) -> RealTokens | None:
        """`BatchLayout.real_tokens` of the current layout (None without one: no padding known)."""
        return self.layout.real_tokens(seg, tokens_per_row) if self.layout is not None else None

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
