"""Reading the weight of a frozen projection, quantized or not.

DoRA needs the base weight itself (its row norms), and merging needs it to add the LoRA
product. Transformers builds `nn.Linear`, or bitsandbytes' `Linear4bit` / `Linear8bitLt`
when the base is loaded quantized; this module turns any of them into a dense fp32 matrix.
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(layer: nn.Module) -> bool:
    """True for bitsandbytes 4-bit and 8-bit linear layers."""
    weight = getattr(layer, "weight", None)
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense ``(out_features, in_features)`` fp32 tensor.

    For quantized layers this dequantizes (a new tensor each call); for plain layers it is
    the weight itself cast to fp32 (no copy when it already is fp32).
    """
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        import bitsandbytes.functional as bnbf

        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = layer.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scales).float()
    return weight.float()


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a plain or bitsandbytes linear layer."""
    try:
        return layer.in_features, layer.out_features
    except AttributeError as err:
        raise TypeError(f"{type(layer).__name__} is not a linear layer: adapters wrap nn.Linear "
                        "and bitsandbytes Linear4bit/Linear8bitLt only") from err
