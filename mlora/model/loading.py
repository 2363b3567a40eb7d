"""Loading the frozen base model: hub id, local folder or `.gguf` file; dtype; 4/8-bit."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mlora.config import DTYPE_NAMES
from mlora.errors import MloraError, one_line

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


class ModelLoadError(MloraError, RuntimeError):
    """The base model (or its tokenizer) could not be loaded; the message says how to fix it."""


def resolve_dtype(dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16" | torch.dtype | None`` -> torch dtype (None means fp32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(str(dtype), str(dtype))
    if key not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch device; None: CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype, device: torch.device) -> torch.dtype:
    """The base dtype of a run: `dtype` when given (see `resolve_dtype`); None: bf16 on a CUDA
    `device` that supports it, else fp32 (training and evaluation; loading alone defaults to fp32)."""
    if dtype is not None:
        return resolve_dtype(dtype)
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def _quantization_config(quantize: str | None, dtype: torch.dtype):
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"quantize {quantize!r} is not supported; use '4bit' or '8bit'")


def split_gguf(name_or_path: str) -> tuple[str, str | None]:
    """``"dir/model.gguf"`` -> ``("dir", "model.gguf")``; anything else -> ``(name, None)``."""
    if str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        return str(path.parent), path.name
    return str(name_or_path), None


def load_base_model(name_or_path: str, *, dtype=None, quantize: str | None = None,
                    device: str | torch.device | None = None, attn_impl: str | None = None,
                    trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer with every parameter frozen.

    Args:
        name_or_path: hub id, local folder, or path to a ``.gguf`` file.
        dtype: ``fp32`` (default), ``bf16`` or ``fp16``; the compute dtype of a quantized base.
        quantize: None, ``"4bit"`` (NF4, double quantization) or ``"8bit"`` (bitsandbytes).
        device: where to put the model (default: CUDA when available, else CPU).
        attn_impl: transformers' attention implementation (``sdpa``, ``eager``, ...).
    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token.
    Raises:
        ModelLoadError: the model cannot be found or read; the message names it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    device = default_device(device)
    folder, gguf_file = split_gguf(name_or_path)
    # A hub id is "org/name"; anything path-like must exist on disk.
    looks_local = folder.startswith((".", "/", "~")) or folder.count("/") > 1 or os.path.sep != "/" and os.path.sep in folder
    if gguf_file is not None and not (Path(folder) / gguf_file).is_file():
        raise ModelLoadError(f"base model file {name_or_path} does not exist")
    if looks_local and gguf_file is None and not Path(folder).is_dir():
        raise ModelLoadError(f"base model folder {name_or_path} does not exist")
    if gguf_file is not None:
        from mlora.model.gguf import materialize

        # Dequantize once into the cache; every later load reads plain safetensors.
        folder, gguf_file = str(materialize(Path(folder) / gguf_file, attn_impl=attn_impl)), None
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_impl:
        kwargs["attn_implementation"] = attn_impl
    qconfig = _quantization_config(quantize, torch_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    from mlora.hub import local_files_only, not_loaded_reason

    # The hub rule (mlora.hub): a cached hub id (or any, offline) is read from the cache alone.
    kwargs["local_files_only"] = local_files_only(folder)
    if kwargs["local_files_only"]:
        # transformers looks for a PEFT adapter_config.json in the repository without passing
        # local_files_only on; it takes it through adapter_kwargs.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                  local_files_only=kwargs["local_files_only"])
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        why = one_line(err) if Path(folder).exists() else not_loaded_reason(folder, err)
        raise ModelLoadError(f"could not load base model {name_or_path!r}: {why}") from err
    if qconfig is None:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
