"""The plain per-expert MixLoRA FFN: the reference the shared-base path is tested against.

Every expert runs the frozen projections again on its own tokens and adds its own LoRA (or
DoRA) terms, one expert at a time: no shared base, no fused kernel, no grouped GEMMs. Only the
router (`mlora.model.router`) is shared with the code under test.

With dropout on, the masks come from the adapter's stream in the order the official `mixlora`
package's LoRA layers imply, one per projection: gate, then up, then down, each over all routed
pairs sorted by expert (stable), so that the same generator gives both paths the same masks.

`use_reference(model)` swaps every `MixLoraFFN` of a `MultiAdapterModel` for a
`ReferenceMixLoraFFN` holding the same modules (``on=False`` swaps back); the benchmark's
``mixlora-ref`` configuration uses it too.
"""

import torch
from torch import nn

from mlora.kernels.lora import dropout_mask
from mlora.model.context import join_segments
from mlora.model.lora import LoraLinear
from mlora.model.mixlora import MixLoraFFN, MixLoraMoe

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _frozen(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


def reference_moe(moe: MixLoraMoe, x: torch.Tensor, mlp: nn.Module, seq_len: int, real,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's MoE FFN, expert by expert: ``x (N, hidden)`` -> ``(out (N, hidden) fp32,
    router logits (N, E))``; `seq_len`, `real` and `generator` as in `MixLoraMoe.forward`."""
    logits, r = moe.moe_gate.route_tokens(x, seq_len, real, generator)
    order = torch.argsort(r.expert, stable=True)
    token, expert, weight = r.token[order], r.expert[order], r.weight[order, None]
    widths = {"gate_proj": x.shape[1], "up_proj": x.shape[1], "down_proj": _frozen(mlp.down_proj).in_features}
    masks = {}
    for proj in PROJECTIONS:  # one mask per projection, in this order
        if proj in moe.experts and moe.experts[proj].dropout > 0 and moe.training:
            masks[proj] = dropout_mask((token.shape[0], widths[proj]), moe.experts[proj].dropout, x.device, generator)

    def project(proj, e, pairs, inp):
        base = _frozen(getattr(mlp, proj))
        out = base(inp.to(x.dtype)).float()
        if proj not in moe.experts:
            return out
        ex = moe.experts[proj]
        h = inp.float()
        if proj in masks:
            h = h * masks[proj][pairs] / (1.0 - ex.dropout)
        out = out + (h @ ex.lora_A[e].T @ ex.lora_B[e].T) * ex.scaling
        return out * ex.dora_scale(base)[e] if ex.use_dora else out

    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(moe.cfg.num_experts):
        pairs = (expert == e).nonzero().squeeze(1)
        if pairs.numel() == 0:
            continue
        tok = token[pairs]
        a = moe.act_fn(project("gate_proj", e, pairs, x[tok])) * project("up_proj", e, pairs, x[tok])
        out = out.index_add(0, tok, weight[pairs] * project("down_proj", e, pairs, a))
    if r.dropped is not None and bool(r.dropped.any()):
        idx = r.dropped.nonzero().squeeze(1)
        gate, up, down = (_frozen(getattr(mlp, p)) for p in PROJECTIONS)
        out = out.index_add(0, idx, down(mlp.act_fn(gate(x[idx])) * up(x[idx])).float())
    return out, logits


class ReferenceMixLoraFFN(MixLoraFFN):
    """`MixLoraFFN` with each MixLoRA segment computed by `reference_moe`."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        segments = [s for s in self.context.segments(h.shape[0]) if s.name in self.moes]
        out = self.base_mlp(h)  # rows of LoRA adapters and of no adapter
        if not segments:
            return out
        seq_len, hidden = h.shape[1:]

        def segment_rows(seg):
            n = (seg.end - seg.start) * seq_len
            real = self.context.real_tokens(seg, seq_len)
            moe, gen = self.moes[seg.name], self.context.generator(seg.name)
            y, logits = reference_moe(moe, h[seg.start:seg.end].reshape(n, hidden), self.base_mlp, seq_len, real, gen)
            self.context.record(seg.name, logits, self.context.segment_mask(seg))
            y = y.to(h.dtype).view(seg.end - seg.start, seq_len, hidden)
            return self._ffn_dropout(moe, y, gen, real)

        return join_segments(segments, h.shape[0], segment_rows, lambda start, end: out[start:end])


def use_reference(model, on: bool = True) -> None:
    """Run every MixLoRA FFN of `model` (a `MultiAdapterModel`) through the reference, or back."""
    cls = ReferenceMixLoraFFN if on else MixLoraFFN
    for path, module in list(model.model.named_modules()):
        if isinstance(module, MixLoraFFN) and type(module) is not cls:
            swapped = cls(module.base_mlp, module.context)
            swapped.moes = module.moes  # the same adapters: parameters, gradients and keys unchanged
            swapped.train(module.training)
            parent, _, attr = path.rpartition(".")
            setattr(model.model.get_submodule(parent), attr, swapped)
