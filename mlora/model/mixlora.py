"""MixLoRA / MixDoRA: LoRA experts with a router inside each SwiGLU FFN (arXiv 2404.15159).

Expert ``e`` of an adapter is the frozen FFN ``down(act(gate h) * up h)`` with its own LoRA
on the targeted FFN projections. A per-adapter router (`mlora.model.router`) picks experts
per token; the FFN output is ``sum_e w_e expert_e(h)``.

Shared-base computation (`MixLoraFFN`, exact by linearity, DESIGN.md section 5):
    * the frozen ``gate`` and ``up`` run once per token, for all experts (and all adapters);
    * each routed (token, expert) pair adds only its expert's LoRA term, grouped by expert
      (one small GEMM per expert, no loop over tokens);
    * the frozen ``down`` runs once on ``sum_e w_e a_e`` and the experts' down-LoRA terms are
      added with the same weights. DoRA rescales the down output per expert, which breaks
      that linearity, so a DoRA down projection falls back to the frozen ``down`` per
      routed pair.
The plain per-expert computation this is tested against lives with the tests
(``tests/model/reference_moe.py``).

Every expert LoRA draws its own dropout mask per projection (gate, up, down, in that order,
over the routed pairs sorted by expert), as the official package's LoRA layers do. Padding
is routed to no expert and every random draw covers real tokens only: an adapter's segment
trains the same whatever padding its neighbours in the batch bring
(`mlora.model.context.RealTokens`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from mlora.config import MixLoraConfig
from mlora.kernels.backend import expert_ffn  # Triton on CUDA, the torch path elsewhere
from mlora.kernels.expert_ffn import ExpertLoraWeights
from mlora.kernels.lora import token_dropout_mask
from mlora.model.adapter_dict import AdapterDict
from mlora.model.context import AdapterContext, RealTokens, Segment, join_segments
from mlora.model.lora import LoraLinear
from mlora.model.quant import dense_weight, linear_features
from mlora.model.router import Router

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _base(module: nn.Module) -> nn.Module:
    """The frozen projection under a `LoraLinear` wrapper (or the module itself)."""
    return module.base_layer if isinstance(module, LoraLinear) else module


# ----------------------------------------------------------------------------- experts
class ExpertLora(nn.Module):
    """The LoRA (or DoRA) of `num_experts` experts on one projection, stacked.

    Parameters (fp32): ``lora_A (E, r, in)``, ``lora_B (E, out, r)`` and, for DoRA,
    ``magnitude (E, out)`` initialised to the row norms of the frozen weight.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, *, r: int, scaling: float,
                 lora_dropout: float, use_dora: bool, lora_init: str):
        super().__init__()
        in_f, out_f = linear_features(base_layer)
        device = base_layer.weight.device
        self.scaling, self.dropout, self.use_dora = scaling, lora_dropout, use_dora
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_f, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_f, r, device=device))
        for e in range(num_experts):
            if lora_init == "gaussian":
                nn.init.normal_(self.lora_A[e], std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        if use_dora:
            norms = dense_weight(base_layer).norm(p=2, dim=1)
            self.magnitude = nn.Parameter(norms.detach().expand(num_experts, -1).clone())

    @torch.no_grad()
    def _merged_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B_e A_e||_row`` for every expert, ``(E, out)``, without forming E matrices.

        ``||w + s b A||^2 = ||w||^2 + 2 s b . (A w) + s^2 b (A A^T) b`` row by row.
        """
        s = self.scaling
        wa = torch.einsum("oi,eri->eor", weight, self.lora_A)            # (E, out, r)
        aat = torch.einsum("eri,eqi->erq", self.lora_A, self.lora_A)     # (E, r, r)
        cross = (self.lora_B * wa).sum(-1)                               # (E, out)
        quad = (torch.einsum("eor,erq->eoq", self.lora_B, aat) * self.lora_B).sum(-1)
        sq = weight.square().sum(-1)[None] + 2 * s * cross + s * s * quad
        return sq.clamp_min(0).sqrt()

    def dora_scale(self, base_layer: nn.Module) -> torch.Tensor:
        """``m_e / ||W + s B_e A_e||_row`` ``(E, out)``, the norm detached (DoRA paper, 4.3)."""
        return self.magnitude / self._merged_norms(dense_weight(base_layer))

    def _drop(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if not (self.dropout > 0 and self.training):
            return x
        # Rows are routed pairs of real tokens only (`router.route`): the same rows alone or not.
        mask = token_dropout_mask(x.shape[0], x.shape[1], self.dropout, x.device, generator)
        return x * mask / (1.0 - self.dropout)

    def grouped(self, x: torch.Tensor, base_out: torch.Tensor, counts: list[int],
                experts: torch.Tensor, scale: torch.Tensor | None, generator=None) -> torch.Tensor:
        """Adapted outputs of routed pairs sorted by expert.

        Args:
            x: ``(M, in)`` fp32 inputs, rows grouped by expert in order (``counts[e]`` rows each).
            base_out: ``(M, out)`` fp32 frozen outputs ``W x`` (no bias) of the same rows.
            counts: rows per expert, summing to M.
            experts: ``(M,)`` the expert of each row (for DoRA's per-expert scale).
            scale: ``(E, out)`` DoRA scale from `dora_scale`, or None.
        Returns:
            ``(M, out)`` fp32: ``W x + s B_e A_e drop(x)``, DoRA-rescaled when enabled.
        """
        h = self._drop(x, generator)
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                # One GEMM pair per expert group; rank r is tiny, so A first.
                pieces.append((h[start:start + n] @ self.lora_A[e].T) @ self.lora_B[e].T)
            start += n
        delta = torch.cat(pieces) * self.scaling if pieces else x.new_zeros(base_out.shape)
        out = base_out + delta
        return out * scale[experts] if scale is not None else out


# ----------------------------------------------------------------------------- one adapter
class MixLoraMoe(nn.Module):
    """One MixLoRA adapter's router and experts inside one FFN.

    ``moe_gate`` is the adapter's `Router` (``moe_gate.weight (E, hidden)`` fp32, no bias);
    ``experts`` maps each targeted FFN projection name to its stacked `ExpertLora`.
    """

    def __init__(self, mlp: nn.Module, cfg: MixLoraConfig):
        super().__init__()
        for proj in FFN_PROJECTIONS:
            if getattr(_base(getattr(mlp, proj)), "bias", None) is not None:
                # Routing weights need not sum to 1 (switch, dynamic), so a bias would not
                # factor out of the shared frozen down; no supported architecture has one.
                raise ValueError(f"MixLoRA needs bias-free FFN projections; {proj} has a bias")
        hidden, _ = linear_features(_base(mlp.gate_proj))
        device = _base(mlp.gate_proj).weight.device
        self.cfg = cfg
        self.moe_gate = Router(hidden, cfg, device)
        ex = cfg.expert_settings()
        self.experts = nn.ModuleDict({
            proj: ExpertLora(_base(getattr(mlp, proj)), cfg.num_experts, r=ex.r, scaling=ex.scaling,
                             lora_dropout=ex.lora_dropout, use_dora=ex.use_dora, lora_init=ex.lora_init)
            for proj in FFN_PROJECTIONS if proj in cfg.target_modules
        })
        self.act_fn = ACT2FN[cfg.act_fn] if cfg.act_fn else mlp.act_fn

    @property
    def dora_down(self) -> bool:
        return "down_proj" in self.experts and self.experts["down_proj"].use_dora

    def forward(self, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, mlp: nn.Module, seq_len: int,
                real: RealTokens | None, generator: torch.Generator | None = None):
        """Shared-base MoE for one segment's N tokens.

        Args:
            x: ``(N, hidden)`` FFN input; g, u: ``(N, inter)`` frozen gate/up outputs of x.
            mlp: the wrapped FFN (for its frozen ``down`` and activation).
            seq_len: tokens per row; real: the segment's real tokens (None: all N are real).
            generator: this adapter's random stream (jitter, dropout); None: the global RNG.
                Every draw covers real tokens (or their routed pairs) only.
        Returns:
            ``(mixed, extra, logits)``: ``mixed (N, inter)`` = sum_e w_e a_e (the frozen down's
            input), ``extra (N, hidden)`` fp32 to add after the frozen down (or, for a DoRA
            down, the whole output, with ``mixed`` zero), and the router logits ``(N, E)``.
        """
        logits, r = self.moe_gate.route_tokens(x, seq_len, real, generator)
        order = torch.argsort(r.expert, stable=True)
        token, expert, weight = r.token[order], r.expert[order], r.weight[order, None]
        counts = torch.bincount(expert, minlength=self.cfg.num_experts).tolist()
        down = _base(mlp.down_proj)
        if not any(ex.use_dora for ex in self.experts.values()):
            # The common case: one memory-lean autograd function (recomputes in backward).
            lora = {p: ExpertLoraWeights(ex.lora_A, ex.lora_B, ex.scaling, ex.dropout)
                    for p, ex in self.experts.items()}
            mixed, extra = expert_ffn(x, g, u, token, weight[:, 0], counts, self.act_fn, lora.get("gate_proj"),
                                      lora.get("up_proj"), lora.get("down_proj"), self.training, generator)
        else:
            mixed, extra = self._dora_pairs(x, g, u, token, expert, weight, counts, mlp, generator)
        if r.dropped is not None and bool(r.dropped.any()):
            # Switch overflow (and padding): the frozen FFN, untouched by experts.
            idx = r.dropped.nonzero().squeeze(1)
            base_act = (mlp.act_fn(g[idx]) * u[idx]).float()
            if self.dora_down:
                extra = extra.index_add(0, idx, down(base_act.to(g.dtype)).float())
            else:
                mixed = mixed.index_add(0, idx, base_act)
        return mixed, extra, logits

    def _dora_pairs(self, x, g, u, token, expert, weight, counts, mlp, generator):
        """MixDoRA experts through plain autograd: ``(mixed (N, I), extra (N, H))`` fp32.

        Dropout masks are drawn per projection over all pairs, gate then up then down: the
        same draws as `expert_ffn` makes for plain LoRA experts."""
        xs = x[token].float()
        gs = self._grouped("gate_proj", xs, g[token].float(), counts, expert, mlp, generator)
        us = self._grouped("up_proj", xs, u[token].float(), counts, expert, mlp, generator)
        act = self.act_fn(gs) * us                                            # (M, inter)
        mixed = act.new_zeros(x.shape[0], act.shape[1])
        extra = act.new_zeros(x.shape[0], x.shape[1])
        down = _base(mlp.down_proj)
        if self.dora_down:
            # Per-pair frozen down: DoRA's per-expert row scale is not linear across experts.
            out = self._grouped("down_proj", act, down(act.to(g.dtype)).float(), counts, expert, mlp, generator)
            extra = extra.index_add(0, token, weight * out)
        else:
            mixed = mixed.index_add(0, token, weight * act)
            if "down_proj" in self.experts:
                lora = self._grouped("down_proj", act, act.new_zeros(act.shape[0], x.shape[1]), counts, expert, mlp,
                                     generator)
                extra = extra.index_add(0, token, weight * lora)
        return mixed, extra

    def _grouped(self, proj, inp, frozen, counts, expert, mlp, generator=None):
        """Frozen outputs of routed pairs plus their experts' LoRA/DoRA (unchanged if untargeted)."""
        if proj not in self.experts:
            return frozen
        ex = self.experts[proj]
        scale = ex.dora_scale(_base(getattr(mlp, proj))) if ex.use_dora else None
        return ex.grouped(inp, frozen, counts, expert, scale, generator)


# ----------------------------------------------------------------------------- the FFN
class MixLoraFFN(nn.Module):
    """A SwiGLU FFN (kept as `base_mlp`) serving LoRA and MixLoRA adapters in one batch.

    ``forward(h (B, T, hidden)) -> (B, T, hidden)``. Rows of MixLoRA segments are routed by
    their adapter's router; all other rows run the FFN as usual (through the LoRA wrappers
    on its projections). The frozen gate, up and down run once over all rows. Each MixLoRA
    segment's router logits go to the forward's collector (`AdapterContext.record`).
    """

    def __init__(self, base_mlp: nn.Module, context: AdapterContext):
        super().__init__()
        self.base_mlp = base_mlp
        self.moes = AdapterDict()
        # A plain attribute, not a submodule: the context is shared by every wrapper.
        object.__setattr__(self, "context", context)

    def add(self, cfg: MixLoraConfig) -> MixLoraMoe:
        self.moes[cfg.name] = MixLoraMoe(self.base_mlp, cfg)
        return self.moes[cfg.name]

    def remove(self, name: str) -> bool:
        if name in self.moes:
            del self.moes[name]
        return len(self.moes) == 0

    @property
    def base_module(self) -> nn.Module:
        return self.base_mlp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h (B, T, hidden) -> (B, T, hidden)`` under the segments of the current forward."""
        mlp = self.base_mlp
        segments = [s for s in self.context.segments(h.shape[0]) if s.name in self.moes]
        if not segments:
            return mlp(h)
        batch = h.shape[0]
        g, u = mlp.gate_proj(h), mlp.up_proj(h)
        extras: dict[Segment, tuple[torch.Tensor, RealTokens | None]] = {}
        acts = join_segments(segments, batch, lambda seg: self._segment_experts(seg, h, g, u, extras),
                             lambda start, end: mlp.act_fn(g[start:end]) * u[start:end])
        y = mlp.down_proj(acts)
        return join_segments(segments, batch, lambda seg: self._segment_output(y, seg, *extras[seg]),
                             lambda start, end: y[start:end])

    def _segment_experts(self, seg: Segment, h: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                         extras: dict) -> torch.Tensor:
        """A MixLoRA segment's input to the frozen down ``(rows, T, inter)``; its router logits go to
        the forward's collector and ``extras[seg]`` gets what to add after the down (`MixLoraMoe.forward`)."""
        rows, (seq_len, hidden) = slice(seg.start, seg.end), h.shape[1:]
        n = (seg.end - seg.start) * seq_len
        # Routing, the aux loss and every random draw see the segment's real tokens only.
        real = self.context.real_tokens(seg, seq_len)
        mixed, extra, logits = self.moes[seg.name](
            h[rows].reshape(n, hidden), g[rows].reshape(n, -1), u[rows].reshape(n, -1),
            self.base_mlp, seq_len, real, self.context.generator(seg.name))
        self.context.record(seg.name, logits, self.context.segment_mask(seg))
        extras[seg] = (extra.view(seg.end - seg.start, seq_len, hidden), real)
        return mixed.to(g.dtype).view(seg.end - seg.start, seq_len, -1)

    def _segment_output(self, y: torch.Tensor, seg: Segment, extra: torch.Tensor,
                        real: RealTokens | None) -> torch.Tensor:
        """A MixLoRA segment's FFN output ``(rows, T, hidden)`` from the frozen down's output `y`."""
        moe = self.moes[seg.name]
        # A DoRA down computed the whole segment output per expert (see MixLoraMoe.forward).
        out = extra.to(y.dtype) if moe.dora_down else y[seg.start:seg.end] + extra.to(y.dtype)
        return self._ffn_dropout(moe, out, self.context.generator(seg.name), real)

    def _ffn_dropout(self, moe: MixLoraMoe, out: torch.Tensor, generator, real: RealTokens | None) -> torch.Tensor:
        """Switch's dropout on a segment's FFN output ``out (rows, T, hidden)``, drawn over its real tokens."""
        p = moe.cfg.ffn_dropout if moe.cfg.routing_strategy == "mixlora-switch" else 0.0
        if not (p > 0 and self.training):
            return out
        tokens = out.shape[0] * out.shape[1]
        mask = token_dropout_mask(tokens, out.shape[-1], p, out.device, generator,
                                  real.index if real is not None else None)
        return out * mask.view(out.shape) / (1.0 - p)
