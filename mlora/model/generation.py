"""Batched generation for many adapters at once over one shared base model.

    from mlora.model.generation import GenerationSettings, generate_rows

    ids = tokenizer(prompt).input_ids
    for rows in generate_rows(model, [ids] * 3, ["lora_0", "mixlora_1", None],
                              GenerationSettings(max_new_tokens=64), eos_token_id=tokenizer.eos_token_id):
        print([tokenizer.decode(row.tokens) for row in rows])   # after every step: one more token each

`model` is a `MultiAdapterModel` holding the adapters; each row of the batch answers with one
adapter (``None``: the bare base model). All rows run through one forward per step: the frozen
base once over every row, each adapter's LoRA delta and MixLoRA routing on its own rows (the
`BatchLayout` segments). Prompts are left-padded to one width, each row keeps its own positions,
and the step after the prompt feeds one token per row against a key/value cache (transformers'
own cache, laid out over rows like the batch). A row stops at an end-of-sequence token or after
``max_new_tokens``; its rows are then dropped from the batch and from the cache, so a long answer
never makes the finished ones cost anything more.

Greedy decoding (temperature 0) gives the tokens transformers' ``generate`` gives for each
adapter alone (`MixLoraModelForCausalLM`, the inference API). Sampling draws from each row's own
random stream seeded with ``seed``: a row's answer depends on its adapter, prompt and seed, not on
which other rows share the batch.

For rows of a MixLoRA adapter every step also records the routing of the position that predicted
the new token: per MixLoRA layer, the router's probabilities and the experts the adapter's
strategy picked (`TokenRouting`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mlora.data.tokenize import pad_rows
from mlora.errors import MloraError
from mlora.model.adapted import MultiAdapterModel, decoder_layers, position_ids
from mlora.model.context import BatchLayout, RouterLogits, Segment
from mlora.model.mixlora import MixLoraFFN
from mlora.model.router import route


class GenerationError(MloraError, ValueError):
    """Generation settings or requests that cannot be run; the message names the value."""


@dataclass(frozen=True)
class GenerationSettings:
    """How every row of one batched generation decodes.

    Attributes:
        max_new_tokens: tokens to generate per row at most (>= 1).
        temperature: 0 = greedy (deterministic); > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``
            (in (0, 1]; 1 = all). Only with temperature > 0.
        seed: seed of every row's own random stream (sampling only).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raise `GenerationError` naming every setting out of range."""
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if problems:
            raise GenerationError("; ".join(problems))


@dataclass(frozen=True)
class TokenRouting:
    """Where one generated token's predicting position went in a MixLoRA adapter.

    Attributes:
        layers: ``(L,)`` indices of the decoder layers that hold this adapter's experts.
        probs: ``(L, E)`` fp32 router probabilities ``softmax(router logits)``.
        chosen: ``(L, E)`` bool, the experts the adapter's strategy routed to (top-k, the
            top-p set, or switch's top-1; switch capacity is not applied here).
    """

    layers: tuple[int, ...]
    probs: torch.Tensor
    chosen: torch.Tensor

    def experts(self) -> list[list[int]]:
        """The chosen experts of each layer, most probable first."""
        out = []
        for probs, chosen in zip(self.probs.tolist(), self.chosen.tolist()):
            picked = [e for e, c in enumerate(chosen) if c]
            out.append(sorted(picked, key=lambda e: -probs[e]))
        return out


@dataclass
class RowState:
    """One row of a batched generation, as it stands after the latest step.

    Attributes:
        adapter: the adapter answering (None: the base model).
        tokens: the generated token ids so far (an end-of-sequence token, when reached, included).
        routing: one `TokenRouting` per generated token for a MixLoRA adapter; empty otherwise.
        finished: True once the row met an end-of-sequence token or ``max_new_tokens``.
    """

    adapter: str | None
    tokens: list[int] = field(default_factory=list)
    routing: list[TokenRouting] = field(default_factory=list)
    finished: bool = False


def generate(model: MultiAdapterModel, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
             settings: GenerationSettings | None = None, **kwargs) -> list[RowState]:
    """`generate_rows` run to the end: the final state of every row."""
    rows = []
    for rows in generate_rows(model, prompts, adapters, settings, **kwargs):
        pass
    return rows


@torch.no_grad()
def generate_rows(model: MultiAdapterModel, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                  settings: GenerationSettings | None = None, *, eos_token_id: int | Sequence[int] | None,
                  pad_token_id: int = 0) -> Iterator[list[RowState]]:
    """Generate for every row in one batched loop, yielding after each step.

    Args:
        model: a `MultiAdapterModel` in eval mode holding every adapter named in `adapters`.
        prompts: one prompt per row, token ids (the same prompt for every row to compare adapters).
        adapters: the adapter of each row, in the order of `prompts`; None = the bare base model.
            An adapter may answer several rows.
        settings: decoding settings (default `GenerationSettings()`).
        eos_token_id: the end-of-sequence id (or ids) that stop a row; None: only the length does.
        pad_token_id: the id written in left padding (never attended to).
    Yields:
        After every step, the list of `RowState` in the order of `prompts` (the same objects each
        time, updated in place): one more token in each unfinished row.
    Raises:
        GenerationError: bad settings, an empty prompt, an adapter the model does not hold, or a
            model in training mode.
    """
    settings = settings or GenerationSettings()
    settings.check()
    _check_rows(model, prompts, adapters)
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    device = model.model.get_input_embeddings().weight.device
    # Rows of one adapter side by side: one segment per adapter, its router logits in one block.
    first = {name: adapters.index(name) for name in adapters}
    order = sorted(range(len(adapters)), key=lambda i: first[adapters[i]])
    states = [RowState(adapters[i]) for i in range(len(adapters))]
    active = [states[i] for i in order]  # the rows of the batch, in batch order
    moe_layers = {name: _moe_layers(model, name) for name in set(adapters) if _is_moe(model, name)}
    sample = settings.temperature > 0
    generators = [torch.Generator(device).manual_seed(settings.seed) for _ in active] if sample else []

    input_ids, attention, positions = _left_padded([prompts[i] for i in order], pad_token_id, device)
    cache = None
    for _ in range(settings.max_new_tokens):
        new = attention[:, -input_ids.shape[1]:]  # the mask of this step's tokens: padding only in the prompts
        layout = _layout([row.adapter for row in active], None if bool(new.all()) else new.bool())
        logits, cache, router_logits = _step(model, input_ids, attention, positions, cache, layout)
        logits = logits[:, -1].float()                                    # (B, vocab)
        chosen = _next_tokens(logits, settings, generators)               # (B,)
        routing = _routing(model, layout, router_logits, moe_layers, input_ids.shape[1])
        for b, (row, token) in enumerate(zip(active, chosen.tolist())):
            row.tokens.append(token)
            if b in routing:
                row.routing.append(routing[b])
            row.finished = row.tokens[-1] in stops or len(row.tokens) >= settings.max_new_tokens
        yield states
        keep = [b for b, row in enumerate(active) if not row.finished]
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, positions, chosen = attention[index], positions[index], chosen[index]
            active = [active[b] for b in keep]
            generators = [generators[b] for b in keep] if sample else []
        input_ids = chosen[:, None]                                       # (B, 1)
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
        positions = positions[:, -1:] + 1


def _check_rows(model: MultiAdapterModel, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> None:
    if model.training:
        raise GenerationError("the model is in training mode (dropout and router jitter on): call model.eval() first")
    if len(prompts) != len(adapters) or not adapters:
        raise GenerationError(f"one prompt per row: got {len(prompts)} prompts for {len(adapters)} adapters")
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("a prompt is empty: every row needs at least one token")
    unknown = sorted({a for a in adapters if a is not None and a not in model.configs})
    if unknown:
        raise GenerationError(f"adapter(s) {unknown} are not loaded (loaded: {sorted(model.configs)})")


def _left_padded(prompts, pad_token_id: int, device):
    """``(input_ids, attention_mask, position_ids)``, each ``(B, T)`` long, prompts at the right end.

    Positions count real tokens only, so a padded row sees the positions it has alone.
    """
    ids, mask, _ = pad_rows(prompts, pad_token_id, "left")
    mask = mask.long()
    return ids.to(device), mask.to(device), position_ids(mask).to(device)


def _layout(adapters: list[str | None], token_mask: torch.Tensor | None) -> BatchLayout:
    """One segment per run of rows of the same adapter; base rows (None) belong to no segment."""
    segments, start = [], 0
    for b in range(1, len(adapters) + 1):
        if b == len(adapters) or adapters[b] != adapters[start]:
            if adapters[start] is not None:
                segments.append(Segment(adapters[start], start, b))
            start = b
    return BatchLayout(tuple(segments), token_mask)


def _cache_argument(hf_model) -> str:
    """The name transformers gives the cache argument (``cache`` in 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def _step(model: MultiAdapterModel, input_ids, attention, positions, cache, layout: BatchLayout):
    """One forward of the shared base over the batch under `layout`.

    Returns ``(logits (B, 1, V), cache, router logits of this step)``.

    Args:
        input_ids: ``(B, T)`` new tokens (the padded prompts first, then one per row).
        attention: ``(B, past + T)`` 1 on real tokens, 0 on padding.
        positions: ``(B, T)`` position of each new token in its row.
        cache: the cache the previous step returned (None at the first step).
    """
    hf_model = model.model
    name = _cache_argument(hf_model)
    # The layout is installed for this one call (the KV cache is an argument forward does not take).
    with model.context.scope(layout) as scope:
        out = hf_model(input_ids=input_ids, attention_mask=attention, position_ids=positions[:, -input_ids.shape[1]:],
                       use_cache=True, logits_to_keep=1, **{name: cache})
    return out.logits, getattr(out, name), scope.router_logits


def _next_tokens(logits: torch.Tensor, settings: GenerationSettings, generators) -> torch.Tensor:
    """The next token of each row from its last logits ``(B, vocab)`` fp32: ``(B,)`` long."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is still short of top_p (at least one token).
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= settings.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # Each row draws from its own stream: its answer does not depend on its neighbours.
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _is_moe(model: MultiAdapterModel, name: str | None) -> bool:
    return name is not None and model.configs[name].is_moe


def _moe_layers(model: MultiAdapterModel, name: str) -> tuple[int, ...]:
    """Indices of the decoder layers whose FFN holds adapter `name`'s experts, in forward order."""
    return tuple(i for i, layer in enumerate(decoder_layers(model.model))
                 if any(isinstance(m, MixLoraFFN) and name in m.moes for m in layer.modules()))


def _routing(model: MultiAdapterModel, layout: BatchLayout, router_logits: RouterLogits, moe_layers: dict,
             width: int) -> dict[int, TokenRouting]:
    """Batch row -> the routing of its last position, for the rows of MixLoRA adapters.

    `router_logits[name]` holds one ``(logits (rows * width, E), mask)`` per MixLoRA layer of
    adapter `name`, for the rows of its segment.
    """
    out = {}
    for seg in layout.segments:
        if seg.name not in moe_layers:
            continue
        cfg = model.configs[seg.name]
        entries = router_logits[seg.name]
        layers = moe_layers[seg.name]
        if len(entries) != len(layers):
            raise RuntimeError(f"adapter {seg.name!r}: {len(entries)} router outputs for {len(layers)} MixLoRA layers")
        rows = seg.end - seg.start
        last = torch.stack([lg.view(rows, width, -1)[:, -1] for lg, _ in entries], dim=1).float()  # (rows, L, E)
        flat = last.reshape(-1, last.shape[-1])
        picked = route(flat, cfg.routing_strategy, top_k=cfg.top_k, top_p=cfg.top_p, temperature=cfg.temperature,
                       capacity=flat.shape[0], seq_len=1)
        chosen = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        chosen[picked.token, picked.expert] = True
        probs = F.softmax(last, dim=-1).cpu()
        chosen = chosen.view(last.shape).cpu()
        for r in range(rows):
            out[seg.start + r] = TokenRouting(layers, probs[r], chosen[r])
    return out
