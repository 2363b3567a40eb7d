"""The MixLoRA router: the gate, the routing strategies, and the balance and z losses.

Each MixLoRA adapter has one `Router` per MoE layer: a bias-free fp32 linear gate
``logits = W_r h`` (init N(0, router_init_range)), with multiplicative jitter on its input
while training. `route` turns the logits into (token, expert, weight) pairs:

    ``mixlora``          softmax, top-k, weights renormalised over the k;
    ``mixlora-switch``   top-1 weighted by its probability, at most ``expert_capacity`` tokens
                         per expert and sequence; tokens over capacity get the frozen FFN;
    ``mixlora-dynamic``  the smallest set of experts whose probability mass reaches ``top_p``
                         (after an optional ``temperature``), weighted by their probabilities.

Padding takes no expert in any strategy (it gets the frozen FFN), and jitter is drawn for real
tokens only (`mlora.model.context.RealTokens`): a segment routes the same whatever padding its
neighbours in the batch bring. The MoE layers hand their logits to the forward's collector;
`router_aux_loss` turns one adapter's logits of one forward into its loss (DESIGN.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlora.config import MixLoraConfig
from mlora.model.context import RealTokens


@dataclass
class Routing:
    """Which experts each token of a segment uses.

    Attributes:
        token: ``(M,)`` token index (into the segment's N flattened tokens) of each pair.
        expert: ``(M,)`` expert index of each pair.
        weight: ``(M,)`` fp32 routing weight of each pair.
        dropped: ``(N,)`` bool, tokens routed to no expert (padding, switch overflow): they get
            the frozen FFN; None when every token is routed.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    dropped: torch.Tensor | None = None


def route(logits: torch.Tensor, strategy: str, *, top_k: int = 2, top_p: float = 1.0,
          temperature: float = 0.0, capacity: int = 0, seq_len: int = 1,
          token_mask: torch.Tensor | None = None) -> Routing:
    """Turn router logits ``(N, E)`` fp32 into (token, expert, weight) pairs.

    `token_mask (N,)` marks the real tokens (None: all real). Padding takes no expert in any
    strategy: it is left out of the pairs and marked `dropped` (it gets the frozen FFN), so
    the pairs of real tokens, and the dropout masks drawn over them, are the same whatever
    padding surrounds them. `seq_len` matters for switch only: capacity is counted per
    sequence of `seq_len` tokens, in position order, over real tokens (padding neither takes
    nor uses capacity).
    """
    n, num_experts = logits.shape
    probs = F.softmax(logits, dim=-1)
    tokens = torch.arange(n, device=logits.device)
    padding = None if token_mask is None else ~token_mask
    if strategy == "mixlora":
        weight, expert = probs.topk(top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        if token_mask is not None:
            tokens, expert, weight = tokens[token_mask], expert[token_mask], weight[token_mask]
        return Routing(tokens.repeat_interleave(top_k), expert.reshape(-1), weight.reshape(-1), dropped=padding)
    if strategy == "mixlora-dynamic":
        if temperature > 0:
            probs = F.softmax(logits / temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep expert j while the mass before it is still short of top_p: the smallest set
        # whose mass reaches top_p (always at least one expert).
        before = sorted_p.cumsum(-1) - sorted_p
        keep = before < top_p
        if token_mask is not None:
            keep &= token_mask[:, None]
        token = tokens[:, None].expand(-1, num_experts)[keep]
        return Routing(token, order[keep], sorted_p[keep], dropped=padding)
    if strategy == "mixlora-switch":
        weight, expert = probs.max(dim=-1)
        real = torch.ones(n, dtype=torch.bool, device=logits.device) if token_mask is None else token_mask
        onehot = F.one_hot(expert, num_experts) * real[:, None]
        position = onehot.view(-1, seq_len, num_experts).cumsum(dim=1).view(n, num_experts)
        within = (position * onehot).sum(-1) <= capacity
        kept = within & real
        return Routing(tokens[kept], expert[kept], weight[kept], dropped=~kept)
    raise ValueError(f"unknown routing strategy {strategy!r}")


class Router(nn.Linear):
    """One MixLoRA adapter's router in one FFN.

    The gate is a bias-free fp32 ``nn.Linear`` (``weight (E, hidden)``, the file's
    ``moe_gate.weight``): ``router(h (N, hidden)) -> (N, E)`` plain logits. `logits` adds the
    training jitter; `route_tokens` routes by the adapter's strategy.
    """

    def __init__(self, hidden: int, cfg: MixLoraConfig, device: torch.device | None = None):
        super().__init__(hidden, cfg.num_experts, bias=False, dtype=torch.float32, device=device)
        nn.init.normal_(self.weight, 0.0, cfg.router_init_range)
        self.cfg = cfg

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None,
               real: RealTokens | None = None) -> torch.Tensor:
        """``(N, E)`` fp32 logits for tokens ``x (N, hidden)``; jitter noise only in training.

        The noise is drawn from `generator` (None: the global RNG) for the real tokens `real`
        only (None: all N), in their order.
        """
        h = x.float()
        if self.training and self.cfg.jitter_noise > 0:
            # Noise on the router's input only, so the frozen projections stay shared.
            j = self.cfg.jitter_noise
            n = h.shape[0] if real is None else real.index.shape[0]
            noise = torch.empty(n, h.shape[1], dtype=h.dtype, device=h.device).uniform_(1.0 - j, 1.0 + j,
                                                                                       generator=generator)
            if real is not None:
                noise = torch.ones_like(h).index_put_((real.index,), noise)
            h = h * noise
        return super().forward(h)

    def route_tokens(self, x: torch.Tensor, seq_len: int, real: RealTokens | None,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, Routing]:
        """Route one segment's tokens ``x (N, hidden)`` (rows of `seq_len` tokens; `real` as in
        `logits`): ``(logits (N, E) fp32, Routing)``."""
        logits = self.logits(x, generator, real)
        c = self.cfg
        routing = route(logits, c.routing_strategy, top_k=c.top_k, top_p=c.top_p, temperature=c.temperature,
                        capacity=c.expert_capacity, seq_len=seq_len,
                        token_mask=real.mask if real is not None else None)
        return logits, routing


def router_aux_loss(cfg: MixLoraConfig, entries: list) -> torch.Tensor:
    """The router loss of one adapter for one forward, from ``output.router_logits[name]``.

    `entries` holds one ``(logits (N, E) fp32, token mask (N,) bool | None)`` per MixLoRA
    layer. All layers' real (non-padding) tokens are pooled, as in Mixtral's loss:
        balance = coef * E * sum_e f_e * P_e
    with ``P_e`` the mean router probability of expert e and ``f_e`` the fraction of tokens
    that route to e (top-k; top-1 before capacity for switch; the top-p set for dynamic).
    Switch adds the z-loss ``z_coef * mean(logsumexp(logits)^2)``. Returns a 0-dim fp32
    tensor (0 when ``router_loss`` is off or there are no entries).
    """
    if not entries or not cfg.router_loss:
        device = entries[0][0].device if entries else None
        return torch.zeros((), device=device)
    logits = torch.cat([lg if m is None else lg[m] for lg, m in entries]).float()
    num_experts = logits.shape[-1]
    probs = F.softmax(logits, dim=-1)
    if cfg.routing_strategy == "mixlora":
        chosen = F.one_hot(probs.topk(cfg.top_k, dim=-1).indices, num_experts).sum(1)
    elif cfg.routing_strategy == "mixlora-switch":
        chosen = F.one_hot(probs.argmax(-1), num_experts)
    else:
        r = route(logits, "mixlora-dynamic", top_p=cfg.top_p, temperature=cfg.temperature)
        chosen = torch.zeros_like(probs).index_put_((r.token, r.expert), torch.ones_like(r.weight))
    balance = num_experts * (chosen.float().mean(0) * probs.mean(0)).sum()
    loss = cfg.router_aux_loss_coef * balance
    if cfg.routing_strategy == "mixlora-switch":
        loss = loss + cfg.router_z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
    return loss
