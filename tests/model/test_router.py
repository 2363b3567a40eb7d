"""The MixLoRA router: routing strategies and the balance and z losses, against counting by hand."""

import pytest
import torch

from mlora.model.router import route, router_aux_loss
from tests.model.test_mixlora import moe_cfg


def independent_balance_loss(logits, mask, top_k, coef):
    """coef * E * sum_e f_e P_e over real tokens, by counting."""
    real = [t for t in range(logits.shape[0]) if mask[t]]
    E = logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    f = [0.0] * E
    P = [0.0] * E
    for t in real:
        for e in probs[t].topk(top_k).indices.tolist():
            f[e] += 1 / len(real)
        for e in range(E):
            P[e] += probs[t, e].item() / len(real)
    return coef * E * sum(fe * pe for fe, pe in zip(f, P))


def test_balance_loss_matches_counting_and_ignores_padding():
    cfg = moe_cfg("m", router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    logits = [torch.randn(12, 4), torch.randn(12, 4)]
    mask = torch.tensor([1] * 9 + [0] * 3, dtype=torch.bool)
    loss = router_aux_loss(cfg, [(lg, mask) for lg in logits])
    pooled = torch.cat(logits)
    expected = independent_balance_loss(pooled, torch.cat([mask, mask]), 2, 0.01)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The same tokens without the padding rows give the same loss.
    trimmed = router_aux_loss(cfg, [(lg[:9], None) for lg in logits])
    assert trimmed.item() == pytest.approx(loss.item(), rel=1e-6)
    assert router_aux_loss(moe_cfg("m", router_loss=False), [(logits[0], None)]).item() == 0.0
    # Switch adds the z-loss mean(logsumexp^2).
    sw = moe_cfg("s", "switch", router_aux_loss_coef=0.0, router_z_loss_coef=0.5)
    z = router_aux_loss(sw, [(logits[0], None)])
    assert z.item() == pytest.approx(0.5 * torch.logsumexp(logits[0], -1).square().mean().item(), rel=1e-5)


def test_routing_strategies_pick_as_specified():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    r = route(logits, "mixlora", top_k=2)
    assert r.expert.tolist() == [0, 1, 3, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.625, 0.375, 0.4 / 0.7, 0.3 / 0.7]))
    d = route(logits, "mixlora-dynamic", top_p=0.8)
    # Token 0: 0.5 + 0.3 reaches 0.8 -> experts 0, 1. Token 1: 0.4 + 0.3 + 0.2 -> three.
    assert list(zip(d.token.tolist(), d.expert.tolist())) == [(0, 0), (0, 1), (1, 3), (1, 2), (1, 1)]
    s = route(torch.log(torch.tensor([[0.7, 0.3]] * 3 + [[0.2, 0.8]])), "mixlora-switch", capacity=2, seq_len=4)
    assert s.dropped.tolist() == [False, False, True, False]
    torch.testing.assert_close(s.weight, torch.tensor([0.7, 0.7, 0.8]))
