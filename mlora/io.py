"""Saving, loading and merging adapters in the PEFT and MixLoRA file layouts (DESIGN.md section 4).

LoRA / DoRA adapters use PEFT's layout, so `peft.PeftModel.from_pretrained` loads them:
``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` /
``lora_magnitude_vector`` (DoRA). MixLoRA adapters use the layout of the `mixlora`
package (see `mlora.model.mixlora_io`). Weights are read from safetensors, or from a
``.bin`` with ``torch.load(weights_only=True)``: nothing in an adapter folder can run code.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlora.config import LoraConfig
    from mlora.model.adapted import MultiAdapterModel

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlora.errors import AdapterFileError
from mlora.model.mixlora_io import (
    mixlora_config_from_json,
    mixlora_config_json,
    mixlora_state_dict,
    mixlora_to_internal,
)

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- reading
def read_json(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not Path(folder).is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: an adapter folder holds {ADAPTER_CONFIG} "
                               f"and {SAFETENSORS_FILE} (or {BIN_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError:
        raise AdapterFileError(f"{path} is not UTF-8 text; an adapter config is a JSON file") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return data


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (safetensors preferred, else a weights-only .bin)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_FILE).is_file():
        try:
            return load_file(str(folder / SAFETENSORS_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{folder / SAFETENSORS_FILE} cannot be read ({err}); the file is damaged or "
                                   "truncated: save or download the adapter again") from None
    if (folder / BIN_FILE).is_file():
        try:
            return torch.load(folder / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors surface as many types
            raise AdapterFileError(f"{folder / BIN_FILE}: not a plain tensor file ({err}); "
                                   "only weights can be loaded from an adapter folder") from err
    raise AdapterFileError(f"{folder} holds no {SAFETENSORS_FILE} or {BIN_FILE}")


def default_name(folder: Path) -> str:
    """A valid adapter name derived from its folder: ``out/arc_c_0`` -> ``arc_c_0``.

    A folder name is the user's business: any folder loads. Characters the adapter-name rule
    does not allow become ``_`` and leading ones it does not allow are dropped (``_v1`` ->
    ``v1``, ``données`` -> ``donn_es``); nothing left gives ``adapter``.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(folder).resolve().name)
    name = name.lstrip("_.-")[:100].rstrip(".")
    return name or "adapter"


def _peft_lora_config(data: dict, name: str, where: Path):
    """Our `LoraConfig` from a PEFT LoRA ``adapter_config.json`` (unsupported features refused)."""
    from mlora.config import LoraConfig

    # PEFT features mlora does not implement: refuse rather than load something different.
    for key in ("fan_in_fan_out", "bias", "modules_to_save", "layers_to_transform",
                "rank_pattern", "alpha_pattern"):
        value = data.get(key)
        if value not in (None, False, "none", {}, []):
            raise AdapterFileError(f"{where}: {key}={value!r} is not supported by mlora; "
                                   "merge the adapter or re-train it without that option")
    targets = data.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise AdapterFileError(f"{where}: target_modules must be a list of module names, got {targets!r}")
    init = data.get("init_lora_weights", True)
    return LoraConfig(
        name=name, r=int(data["r"]), lora_alpha=float(data.get("lora_alpha", 8)),
        lora_dropout=float(data.get("lora_dropout", 0.0)), target_modules=list(targets),
        use_dora=bool(data.get("use_dora", False)), use_rslora=bool(data.get("use_rslora", False)),
        lora_init="gaussian" if init == "gaussian" else "original",
    )


def read_adapter_config(folder, name: str | None = None):
    """``(adapter config, base model path or None)`` for a PEFT LoRA or MixLoRA adapter folder."""
    folder = Path(folder)
    data = read_json(folder)
    name = name or default_name(folder)
    peft_type = str(data.get("peft_type", "")).upper()
    where = folder / ADAPTER_CONFIG
    try:
        if peft_type == "LORA":
            cfg = _peft_lora_config(data, name, where)
        elif peft_type == "MIXLORA":
            cfg = mixlora_config_from_json(data, name, where)
        else:
            raise AdapterFileError(f"{where}: peft_type {data.get('peft_type')!r} is not supported "
                                   "(expected 'LORA' or 'MIXLORA')")
    except KeyError as err:
        raise AdapterFileError(f"{where}: required key {err} is missing") from err
    return cfg, data.get("base_model_name_or_path")


# --------------------------------------------------------------------------- PEFT layout
def peft_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` of a `MultiAdapterModel` as PEFT-named fp32 CPU tensors."""
    state = {}
    for key, param in model.adapter_parameters(name).items():
        key = re.sub(r"\.magnitude$", ".lora_magnitude_vector", key)
        state[PEFT_PREFIX + key] = param.detach().to("cpu", copy=True).contiguous()
    return state


def peft_config_json(cfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.target_modules), "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": "gaussian" if cfg.lora_init == "gaussian" else True,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(model, name: str, folder, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` of a `MultiAdapterModel` to `folder` in its file layout."""
    cfg = model.configs[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.is_moe:
        hf = model.model.config
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "silu"
        config, state = mixlora_config_json(cfg, base_model_name_or_path, act), mixlora_state_dict(model, name)
        # The mixlora package reads only the .bin; safetensors is for everyone else.
        torch.save(state, folder / BIN_FILE)
    else:
        config, state = peft_config_json(cfg, base_model_name_or_path), peft_state_dict(model, name)
    save_file(state, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_adapter(model: MultiAdapterModel, folder, cfg: LoraConfig | None = None, name: str | None = None):
    """Add the adapter saved in `folder` to a `MultiAdapterModel`; returns its config.

    `cfg` (optional) is the config to create it with (e.g. from a run config); its shape
    (r, targets, experts) must match the files. Raises `AdapterFileError` on any mismatch.
    """
    folder = Path(folder)
    file_cfg, _ = read_adapter_config(folder, name or (cfg.name if cfg is not None else None))
    cfg = cfg or file_cfg
    _check_same_shape(cfg, file_cfg, folder)
    tensors = read_weights(folder)
    model.add_adapter(cfg)
    try:
        if cfg.is_moe:
            internal = mixlora_to_internal(tensors, model.adapter_parameters(cfg.name), folder)
        else:
            internal = {}
            for key, value in tensors.items():
                key = key.removeprefix(PEFT_PREFIX)
                key = re.sub(r"\.lora_magnitude_vector(\.weight)?$", ".magnitude", key)
                key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)  # adapter-named keys
                internal[key] = value
        _copy_into(model.adapter_parameters(cfg.name), internal, folder)
    except Exception:
        model.remove_adapter(cfg.name)
        raise
    return cfg


def _check_same_shape(cfg: LoraConfig, file_cfg: LoraConfig, folder: Path) -> None:
    keys = ["r", "use_dora", "target_modules"] + (["num_experts"] if cfg.is_moe else [])
    for key in keys:
        ours, theirs = getattr(cfg, key), getattr(file_cfg, key)
        if key == "target_modules":
            ours, theirs = sorted(ours), sorted(theirs)
        if ours != theirs:
            raise AdapterFileError(f"{folder}: the saved adapter has {key}={theirs!r} but the config asks "
                                   f"for {key}={ours!r}; {key} is fixed once an adapter is created")
    if cfg.is_moe != file_cfg.is_moe:
        raise AdapterFileError(f"{folder}: adapter type differs from the config (LoRA vs MixLoRA)")


def _copy_into(params: dict, tensors: dict, folder: Path) -> None:
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterFileError(f"{folder}: weights do not match the adapter config; "
                               f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                               f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for key, param in params.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise AdapterFileError(f"{folder}: {key} has shape {tuple(value.shape)}, "
                                       f"the model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


# --------------------------------------------------------------------------- merging
def merged_model(model, name: str):
    """A copy of the base model with LoRA/DoRA adapter `name` folded into its weights.

    The copy is a plain transformers model (no wrappers), in the base dtype. Quantized
    bases and MixLoRA adapters cannot be merged and raise `AdapterFileError`.
    """
    from mlora.model.lora import LoraLinear
    from mlora.model.quant import is_quantized

    cfg = model.configs[name]
    if cfg.is_moe:
        raise AdapterFileError(f"adapter {name!r} is a MixLoRA adapter: its routed experts cannot be "
                               "merged into dense weights; load it with MixLoraModelForCausalLM instead")
    plain = copy.deepcopy(model.model)
    for path, module in list(plain.named_modules()):
        if not isinstance(module, LoraLinear):
            continue
        base = module.base_layer
        if is_quantized(base):
            raise AdapterFileError("merging needs an unquantized base model; load it without --quantize")
        if name in module.adapters:
            with torch.no_grad():
                delta = module.adapters[name].delta_weight(base)
                base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        parent_path, _, attr = path.rpartition(".")
        setattr(plain.get_submodule(parent_path) if parent_path else plain, attr, base)
    return plain.eval()
