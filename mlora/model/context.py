"""Which rows of a batch belong to which adapter, and the scope of the one forward that reads it.

A mixed batch is laid out contiguously: rows ``[start, end)`` belong to one adapter. The caller
builds that `BatchLayout`, an immutable value, and passes it into the forward
(``MultiAdapterModel.forward(input_ids, attention_mask, layout)``). `AdapterContext.scope`
installs it for exactly that call as a `ForwardScope`, which every wrapped projection and
MixLoRA FFN reads (segments, random streams, real tokens) and which collects what the MixLoRA
layers produce (router logits), returned by the forward. When the call ends the scope is gone:
no module keeps the last batch's state.

Gradient checkpointing recomputes a layer during backward, after its forward's scope has
ended: `AdapterContext.checkpoint_fn` captures the scope, and the states of the adapters'
random streams, when the layer runs forward and reinstalls both for the recomputation, which
thus sees the same segments and draws the same masks, and records no router logits twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

RouterLogits = dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]
"""Adapter name -> one ``(logits (N, E) fp32, token mask (N,) bool | None)`` per MixLoRA layer."""


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


@dataclass(frozen=True, eq=False)
class BatchLayout:
    """What one forward needs to know about its batch; built by the caller, never changed.

    Attributes:
        segments: contiguous row ranges per adapter, ordered, non-overlapping. Rows that no
            segment covers get the base model's output.
        token_mask: ``(B, T)`` bool, True on real (non-padding) tokens, or None when the
            batch has no padding (`MultiAdapterModel.forward` fills it from the attention
            mask). MixLoRA layers compute their balance loss over these tokens, and random
            draws cover them only.
        generators: adapter name -> its own random stream for dropout masks and router
            jitter. With one stream per adapter, drawn over each segment's real tokens only,
            an adapter's masks do not depend on which adapters share its batch. Adapters
            without one use the global RNG. The forward advances these streams.
    """

    segments: tuple[Segment, ...]
    token_mask: torch.Tensor | None = None
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)

    @staticmethod
    def from_sizes(names_and_sizes, token_mask: torch.Tensor | None = None,
                   generators: Mapping[str, torch.Generator] | None = None) -> BatchLayout:
        """Lay out adapters in the given order: ``[("a", 2), ("b", 3)]`` -> a: [0,2), b: [2,5)."""
        segments, start = [], 0
        for name, size in names_and_sizes:
            segments.append(Segment(name, start, start + size))
            start += size
        return BatchLayout(tuple(segments), token_mask, dict(generators or {}))


def join_segments(segments: Sequence[Segment], rows: int, segment_rows: Callable[[Segment], torch.Tensor],
                  other_rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Per-segment outputs and the rows between segments, joined back in row order along dim 0.

    Args:
        segments: ordered, non-overlapping segments inside ``[0, rows)``.
        rows: the batch's row count B.
        segment_rows: ``seg -> (seg.end - seg.start, ...)`` the output of a segment's rows;
            called once per segment, in order.
        other_rows: ``(start, end) -> (end - start, ...)`` the output of rows no segment covers
            (usually a slice of the base output); called for each gap before the next segment.
    Returns:
        ``(B, ...)``: the pieces concatenated (the single piece itself when there is one).
    """
    pieces, position = [], 0
    for seg in segments:
        if seg.start > position:
            pieces.append(other_rows(position, seg.start))
        pieces.append(segment_rows(seg))
        position = seg.end
    if position < rows:
        pieces.append(other_rows(position, rows))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class ForwardScope:
    """One forward under one layout: what the layers read, and the router logits they write.

    Created by `AdapterContext.scope` for the duration of one call. `layout` None: no layout
    (the context's default adapter, if any, serves every row).

    Attributes:
        layout: the `BatchLayout` of the call, or None.
        router_logits: filled during the call by the MixLoRA layers (`record`), in layer order.
    """

    def __init__(self, layout: BatchLayout | None, *, record: bool = True, real: dict | None = None):
        self.layout = layout
        self.router_logits: RouterLogits = {}
        self._record = record
        # Segment -> RealTokens | None, computed once per forward and shared with its recomputation.
        self._real = {} if real is None else real

    def replay(self) -> ForwardScope:
        """The scope for recomputing a layer of this forward: same layout, nothing recorded."""
        return ForwardScope(self.layout, record=False, real=self._real)

    def record(self, name: str, logits: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Keep a MixLoRA layer's router ``logits (N, E)`` of adapter `name` (mask ``(N,)`` or None)."""
        if self._record:
            self.router_logits.setdefault(name, []).append((logits, mask))

    def generator(self, name: str) -> torch.Generator | None:
        return self.layout.generators.get(name) if self.layout is not None else None

    def segment_mask(self, seg: Segment) -> torch.Tensor | None:
        """``(rows * T,)`` bool, the token mask of `seg`'s rows flattened, or None (no mask known)."""
        if self.layout is None or self.layout.token_mask is None:
            return None
        return self.layout.token_mask[seg.start:seg.end].reshape(-1).bool()

    def real_tokens(self, seg: Segment, tokens_per_row: int) -> RealTokens | None:
        """The real tokens of `seg`, whose rows hold `tokens_per_row` tokens each.

        None when every token of the segment is real (no token mask, or no padding in its
        rows): draws then cover the whole segment, the same as over its real tokens. Also
        None for rows of another width than the token mask (no token grid to map them to).
        Computed once per segment and forward (a host sync on GPU), reused by every layer and
        by the recomputation under gradient checkpointing.
        """
        layout = self.layout
        if layout is None or layout.token_mask is None or layout.token_mask.shape[1] != tokens_per_row:
            return None
        if seg not in self._real:
            mask = layout.token_mask[seg.start:seg.end].reshape(-1).bool()
            self._real[seg] = None if bool(mask.all()) else RealTokens(mask, mask.nonzero().squeeze(1))
        return self._real[seg]


class AdapterContext:
    """The scope of the forward now running over one adapted model (one instance per model).

    Every wrapper of the model holds this object; outside a forward it holds no batch state.
    `default_adapter` (configuration, not per-call state) applies to every row when no layout
    is installed: that is how a model returned by the inference API behaves like a plain
    transformers model.
    """

    def __init__(self):
        self.default_adapter: str | None = None
        self._scope: ForwardScope | None = None

    @contextlib.contextmanager
    def scope(self, layout: BatchLayout | None) -> Iterator[ForwardScope]:
        """Install `layout` for the calls of the model made inside; yields their `ForwardScope`."""
        with self._installed(ForwardScope(layout)) as scope:
            yield scope

    @contextlib.contextmanager
    def _installed(self, scope: ForwardScope | None) -> Iterator[ForwardScope | None]:
        previous, self._scope = self._scope, scope
        try:
            yield scope
        finally:
            self._scope = previous

    # What the layers read; without a scope: the default adapter, the global RNG, no padding known.
    def segments(self, batch_size: int) -> tuple[Segment, ...]:
        """The segments of the current forward (rows of a ``batch_size``-row input)."""
        layout = self._scope.layout if self._scope is not None else None
        if layout is not None:
            return layout.segments
        if self.default_adapter is not None:
            return (Segment(self.default_adapter, 0, batch_size),)
        return ()

    def generator(self, name: str) -> torch.Generator | None:
        """Adapter `name`'s random stream in the current forward (None: the global RNG)."""
        return self._scope.generator(name) if self._scope is not None else None

    def real_tokens(self, seg: Segment, tokens_per_row: int) -> RealTokens | None:
        """`ForwardScope.real_tokens` of the current forward (None without one)."""
        return self._scope.real_tokens(seg, tokens_per_row) if self._scope is not None else None

    def segment_mask(self, seg: Segment) -> torch.Tensor | None:
        """`ForwardScope.segment_mask` of the current forward (None without one)."""
        return self._scope.segment_mask(seg) if self._scope is not None else None

    def record(self, name: str, logits: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Hand router logits to the current forward's collector (dropped outside a forward)."""
        if self._scope is not None:
            self._scope.record(name, logits, mask)

    def checkpoint_fn(self, function, *args, **kwargs):
        """A drop-in for `torch.utils.checkpoint.checkpoint` that replays under the forward's scope.

        The first call of `function` is the forward itself, in its own scope. The recomputation
        in backward runs it again after that scope has ended: it gets the same layout (with the
        same real tokens) in a scope that records nothing, and the adapters' streams are put
        back to their states of the forward, so it draws the same masks and jitter.
        """
        scope = self._scope
        generators = scope.layout.generators if scope is not None and scope.layout is not None else {}
        # torch restores the global RNG for the recomputation; the adapters' own streams here.
        states = {name: g.get_state() for name, g in generators.items()}
        calls = 0

        def run(*inner):
            nonlocal calls
            calls += 1
            if calls == 1:
                return function(*inner)
            for name, state in states.items():
                generators[name].set_state(state)
            with self._installed(scope.replay() if scope is not None else None):
                return function(*inner)

        kwargs.setdefault("use_reentrant", False)
        return checkpoint(run, *args, **kwargs)
