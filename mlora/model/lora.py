"""LoRA and DoRA on a frozen linear layer, for many adapters at once.

`LoraAdapter` holds one adapter's matrices for one projection. `LoraLinear` wraps the
projection transformers built (plain, 4-bit or 8-bit; it stays `base_layer`) and keeps one
`LoraAdapter` per adapter name in an `nn.ModuleDict`. In a mixed batch the frozen
projection runs once over all rows, then each adapter's segment of rows gets that
adapter's delta; rows no adapter claims keep the base output.

Math (DESIGN.md section 5), with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``):
    LoRA: ``y = W x + s * B A dropout(x)``
    DoRA: ``y = m / ||W + s B A||_row * (W x + s B A x)``, the norm detached.
Adapter math runs in fp32; the result is cast back to the base output dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlora.kernels.backend import segmented_lora_add  # Triton on CUDA, torch elsewhere
from mlora.kernels.lora import token_dropout_mask
from mlora.model.adapter_dict import AdapterDict
from mlora.model.context import AdapterContext, RealTokens, join_segments
from mlora.model.quant import dense_weight, linear_features


class LoraAdapter(nn.Module):
    """One adapter on one ``in_features -> out_features`` projection.

    Parameters (fp32): ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)`` and, for DoRA,
    ``magnitude (out,)`` initialised to the row norms of the base weight so that a fresh
    adapter leaves the output unchanged.
    """

    def __init__(self, in_features: int, out_features: int, *, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 lora_init: str = "original", base_weight: torch.Tensor | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.r = r
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.dropout = lora_dropout
        self.use_dora = use_dora
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=torch.float32, device=device)
        if lora_init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / r)
        elif lora_init == "original":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"lora_init must be 'original' or 'gaussian', got {lora_init!r}")
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise its magnitude")
            self.magnitude = nn.Parameter(base_weight.float().norm(p=2, dim=1).detach().clone())

    def lora_product(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A x`` in fp32 for ``x (..., in)`` (already dropped out) -> ``(..., out)``."""
        return self.lora_B(self.lora_A(x)) * self.scaling

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s B A||_row`` ``(out,)`` for the dense fp32 base ``weight (out, in)``."""
        merged = weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        # Detached as in the DoRA paper (section 4.3): the norm is a constant in backward.
        return self.magnitude / merged.norm(p=2, dim=1).detach()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module,
                generator: torch.Generator | None = None, real: RealTokens | None = None) -> torch.Tensor:
        """The DoRA-adapted output for rows ``x (..., in)`` whose frozen output is ``base_out (..., out)``.

        Plain LoRA adapters do not come here: `LoraLinear` runs all of them in one segmented
        call. `generator` draws the dropout mask (default: the global RNG) over the real
        tokens `real` of x's flattened rows (None: all of them).
        """
        if not self.use_dora:
            raise RuntimeError("plain LoRA adapters run through LoraLinear's segmented path")
        dropped = self.dropout > 0.0 and self.training
        h = x.float()
        if dropped:
            tokens = h.numel() // h.shape[-1]
            mask = token_dropout_mask(tokens, h.shape[-1], self.dropout, h.device, generator,
                                      real.index if real is not None else None)
            h = h * mask.view(h.shape) / (1.0 - self.dropout)
        delta = self.lora_product(h)
        weight = dense_weight(base_layer)
        scale = self.dora_scale(weight)
        if not dropped:
            # No dropout: W x is the base output without its bias.
            wx = base_out.float()
            bias = getattr(base_layer, "bias", None)
            if bias is not None:
                wx = wx - bias.float()
        else:
            # With dropout, DoRA's base term sees the same dropped-out input as the LoRA term.
            wx = F.linear(h, weight)
        return base_out + ((scale - 1.0) * wx + scale * delta).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The dense fp32 change ``W' - W`` ``(out, in)`` this adapter makes to the base weight."""
        weight = dense_weight(base_layer)
        product = self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        if not self.use_dora:
            return product
        return self.dora_scale(weight)[:, None] * (weight + product) - weight


class LoraLinear(nn.Module):
    """A frozen projection with any number of named LoRA/DoRA adapters.

    ``forward(x (B, ..., in)) -> (B, ..., out)``: the base layer runs once over all B rows;
    the rows of each segment in the context's layout get that adapter's delta.
    """

    def __init__(self, base_layer: nn.Module, context: AdapterContext):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.adapters = AdapterDict()
        # A plain attribute, not a submodule: the context is shared by every wrapper.
        object.__setattr__(self, "context", context)

    def add(self, name: str, **lora_kwargs) -> LoraAdapter:
        """Create adapter `name` here (see `LoraAdapter` for the keyword arguments)."""
        base_weight = dense_weight(self.base_layer) if lora_kwargs.get("use_dora") else None
        adapter = LoraAdapter(self.in_features, self.out_features, base_weight=base_weight,
                              device=self.base_layer.weight.device, **lora_kwargs)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> bool:
        """Drop adapter `name` if present; True when no adapter is left (unwrap me)."""
        if name in self.adapters:
            del self.adapters[name]
        return len(self.adapters) == 0

    @property
    def base_module(self) -> nn.Module:
        return self.base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        segments = [s for s in self.context.segments(x.shape[0]) if s.name in self.adapters]
        if not segments:
            return self.base_layer(x, *args, **kwargs)
        # The frozen layer over the flattened rows: its output is then no view, and the
        # plain-LoRA deltas go straight into it.
        x2 = x.reshape(-1, x.shape[-1])
        out2 = self.base_layer(x2, *args, **kwargs)
        gen = self.context.generator
        per_row = x[0].numel() // x.shape[-1]              # tokens per batch row
        # Dropout masks cover each segment's real tokens only: the same draws whatever
        # padding its neighbours bring into the batch (context.RealTokens).
        real = {s: self.context.real_tokens(s, per_row) for s in segments} if self.training else {}
        lora = [s for s in segments if not self.adapters[s.name].use_dora]
        if lora:
            # All plain-LoRA segments in one autograd node over the flattened rows.
            names = list(dict.fromkeys(s.name for s in lora))
            index = {n: i for i, n in enumerate(names)}
            ads = [self.adapters[n] for n in names]
            out2 = segmented_lora_add(
                out2, x2, [(s.start * per_row, s.end * per_row, index[s.name]) for s in lora],
                [a.lora_A.weight for a in ads], [a.lora_B.weight for a in ads], [a.scaling for a in ads],
                [a.dropout for a in ads], self.training, [gen(n) for n in names],
                [real[s].index if real.get(s) is not None else None for s in lora])
        out = out2.view(*x.shape[:-1], out2.shape[-1])
        dora = [s for s in segments if self.adapters[s.name].use_dora]
        if not dora:
            return out
        # DoRA rescales rows by its own norms: one piece per DoRA segment, joined once.
        return join_segments(
            dora, x.shape[0],
            lambda seg: self.adapters[seg.name](x[seg.start:seg.end], out[seg.start:seg.end], self.base_layer,
                                                gen(seg.name), real.get(seg)),
            lambda start, end: out[start:end])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.adapters)}"
