"""Reading the weight of a frozen projection, quantized or not.

DoRA needs the base weight itself (its row norms), and merging needs it to add the LoRA
product. Transformers builds `nn.Linear`, or bitsandbytes' `Linear4bit` / `Linear8bitLt`
when the base is loaded quantized; this module turns any of them into a dense fp32 matrix.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _bnb():
    """The bitsandbytes module when it is imported, else None: a model can hold bitsandbytes
    layers only once it is, so plain models never pay for importing it."""
    return sys.modules.get("bitsandbytes")


def is_quantized(layer: nn.Module) -> bool:
    """True for bitsandbytes 4-bit and 8-bit linear layers."""
    bnb = _bnb()
    return bnb is not None and isinstance(getattr(layer, "weight", None), (bnb.nn.Params4bit, bnb.nn.Int8Params))


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense ``(out_features, in_features)`` fp32 tensor.

    For quantized layers this dequantizes (a new tensor each call); for plain layers it is
    the weight itself cast to fp32 (no copy when it already is fp32).
    """
    weight = layer.weight
    bnb = _bnb()
    if bnb is not None and isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if bnb is not None and isinstance(weight, bnb.nn.Int8Params):
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    return weight.float()


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a plain or bitsandbytes linear layer."""
    try:
        return layer.in_features, layer.out_features
    except AttributeError as err:
        raise TypeError(f"{type(layer).__name__} is not a linear layer: adapters wrap nn.Linear "
                        "and bitsandbytes Linear4bit/Linear8bitLt only") from err
