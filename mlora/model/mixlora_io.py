"""The MixLoRA file layout (the `mixlora` package's, PyPI 0.2.3; also MoE-PEFT's).

``adapter_config.json`` has ``peft_type: "MIXLORA"`` plus the LoRA and router settings
(``act_fn`` always written: that package cannot load an adapter without it). Weights:

    mixlora.layers.{L}.self_attn.{proj}.lora_{A,B}.weight          attention LoRA
    mixlora.layers.{L}.mlp.moe_gate.weight                         router (E, hidden)
    mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_{A,B}.weight    expert LoRA
    ....lora_magnitude_vector                                      DoRA magnitudes
    mixlora.layers.{L}.mlp.{proj}.lora_{A,B}.weight                plain FFN LoRA (sparse_step)

Internally the experts of one projection are stacked (``experts.{proj}.lora_A (E, r, in)``);
one renaming function maps each internal parameter to its file names and serves both saving
and loading. Legacy m-LoRA 0.3.2 names (``layers.{L}.gate.weight``,
``layers.{L}.experts.{e}.{proj}...``) are renamed on load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlora.errors import AdapterFileError

if TYPE_CHECKING:
    from mlora.config import MixLoraConfig

PREFIX = "mixlora."
# m-LoRA 0.3.x called the Llama FFN projections w1 (gate), w2 (down), w3 (up).
_LEGACY_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def file_names(key: str, num_experts: int) -> list[str]:
    """File names of one internal parameter (E names for a stacked expert tensor, else one).

    ``model.layers.3.mlp.experts.up_proj.lora_A`` ->
    ``[mixlora.layers.3.mlp.up_proj.experts.0.lora_A.weight, ...]``.
    """
    key = PREFIX + key[key.index("layers."):]
    key = re.sub(r"\.magnitude$", ".lora_magnitude_vector", key)
    stacked = re.match(r"(.*)\.experts\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)$", key)
    if not stacked:
        return [key]
    head, proj, kind = stacked.groups()
    suffix = ".weight" if kind != "lora_magnitude_vector" else ""
    return [f"{head}.{proj}.experts.{e}.{kind}{suffix}" for e in range(num_experts)]


def mixlora_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` of a `MultiAdapterModel` in the MixLoRA layout (fp32 CPU tensors)."""
    cfg = model.configs[name]
    state = {}
    for key, param in model.adapter_parameters(name).items():
        value = param.detach().to("cpu", copy=True)
        names = file_names(key, cfg.num_experts)
        parts = [value] if len(names) == 1 else list(value.unbind(0))
        for file_key, part in zip(names, parts):
            state[file_key] = part.contiguous()
    return state


def _modernise(key: str) -> str:
    """Legacy 0.3.2 names -> current names (current names pass through unchanged)."""
    key = re.sub(r"^(mixlora\.layers\.\d+)\.gate\.weight$", r"\1.mlp.moe_gate.weight", key)
    legacy = re.match(r"^(mixlora\.layers\.\d+)\.experts\.(\d+)\.(\w+)\.(.+)$", key)
    if legacy:
        head, e, proj, rest = legacy.groups()
        key = f"{head}.mlp.{_LEGACY_PROJ.get(proj, proj)}.experts.{e}.{rest}"
    return key


def mixlora_to_internal(tensors: dict, params: dict, folder: Path) -> dict[str, torch.Tensor]:
    """Map file tensors onto the internal parameter keys of `params` (stacking experts).

    File keys nobody asked for are returned under their own names, so the caller reports them.

    Raises:
        AdapterFileError: naming the file keys the model expects and the file lacks (only
            those: the other experts of a stacked tensor are not "unexpected").
    """
    tensors = {_modernise(k): v for k, v in tensors.items()}
    used, internal, missing = set(), {}, []
    for key, param in params.items():
        num = param.shape[0] if ".experts." in key else 1
        names = file_names(key, num)
        used.update(n for n in names if n in tensors)
        if not all(n in tensors for n in names):
            missing += [n for n in names if n not in tensors]
            continue
        parts = [tensors[n] for n in names]
        try:
            internal[key] = parts[0] if len(names) == 1 else torch.stack(parts)
        except RuntimeError as err:
            raise AdapterFileError(f"{folder}: expert tensors of {names[0]} differ in shape ({err})") from err
    if missing:
        raise AdapterFileError(f"{folder}: the weights lack {len(missing)} key(s) the adapter config asks for: "
                               f"{', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
    internal.update({k: v for k, v in tensors.items() if k not in used})
    return internal


def _number(value: float):
    # The mixlora package insists on an int lora_alpha; keep integral values integral.
    return int(value) if float(value).is_integer() else value


def mixlora_config_json(cfg: MixLoraConfig, base_model_name_or_path: str | None, default_act_fn: str) -> dict:
    """``adapter_config.json`` contents for MixLoRA adapter `cfg` (readable by the mixlora package)."""
    data = {
        "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": _number(cfg.lora_alpha), "lora_dropout": float(cfg.lora_dropout),
        "target_modules": list(cfg.target_modules), "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora, "lora_init": cfg.lora_init,
        "routing_strategy": cfg.routing_strategy, "num_experts": cfg.num_experts,
        "act_fn": cfg.act_fn or default_act_fn,
        "router_loss": cfg.router_loss, "router_aux_loss_coef": float(cfg.router_aux_loss_coef),
        "router_init_range": float(cfg.router_init_range), "jitter_noise": float(cfg.jitter_noise),
    }
    if cfg.routing_strategy == "mixlora":
        data["top_k"] = cfg.top_k
    elif cfg.routing_strategy == "mixlora-switch":
        data.update(expert_capacity=cfg.expert_capacity, router_z_loss_coef=float(cfg.router_z_loss_coef),
                    ffn_dropout=float(cfg.ffn_dropout))
    else:
        data.update(top_p=float(cfg.top_p), temperature=float(cfg.temperature))
    if cfg.sparse_step:
        data["sparse_step"] = cfg.sparse_step
    if cfg.expert_lora is not None:
        ex = cfg.expert_settings()
        data["expert_lora"] = {"r": ex.r, "lora_alpha": _number(ex.lora_alpha), "lora_dropout": float(ex.lora_dropout),
                               "use_dora": ex.use_dora, "use_rslora": ex.use_rslora, "lora_init": ex.lora_init}
    return data


def mixlora_config_from_json(data: dict, name: str, where: Path):
    """Our `MixLoraConfig` from a MixLoRA ``adapter_config.json`` (ours, the package's, MoE-PEFT's)."""
    from mlora.config import _ROUTING_ALIASES, _STRATEGY_KEYS, ConfigError, MixLoraConfig, adapter_from_dict
    fields = set(MixLoraConfig.__dataclass_fields__)
    strategy = data.get("routing_strategy", "mixlora")
    strategy = _ROUTING_ALIASES.get(strategy, strategy)
    d = {k: v for k, v in data.items() if k in fields and _STRATEGY_KEYS.get(k, strategy) == strategy}
    d["name"] = name
    d["routing_strategy"] = strategy
    if isinstance(d.get("expert_lora"), dict):
        # Writers copy more than the expert keys into expert_lora (target_modules, peft_type).
        allowed = {"r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "lora_init"}
        d["expert_lora"] = {k: v for k, v in d["expert_lora"].items() if k in allowed}
    try:
        return adapter_from_dict(d, where=str(where))
    except ConfigError as err:
        raise AdapterFileError(f"{where}: {err}") from err
