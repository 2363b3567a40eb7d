"""Plain autograd expressions the kernels are tested against."""

import torch

from mlora.kernels.lora import dropout_mask


def plain_lora_delta(x, A, B, scaling, dropout, training, generator=None):
    """``s * B A dropout(x)`` for ``x (..., in)`` as one autograd expression, in fp32 (or wider).

    The mask is ``dropout_mask(x.shape)`` from `generator`: the draw the kernels make for a
    segment of these rows.
    """
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    if training and dropout > 0:
        h = h * dropout_mask(x.shape, dropout, x.device, generator) / (1.0 - dropout)
    return (h @ A.T @ B.T) * scaling
