"""A frozen causal LM carrying many named adapters at once.

`MultiAdapterModel` wraps the model transformers built. Adding an adapter wraps each
targeted projection in a `LoraLinear` (once; later adapters join the same wrapper) and, for
MixLoRA adapters, each FFN in a `MixLoraFFN`. The wrappers keep the original modules as
`base_layer` / `base_mlp`, so quantized layers stay quantized and nothing is copied.

One forward serves a mixed batch: `forward(input_ids, attention_mask, layout)` where the
layout says which contiguous rows belong to which adapter; the forward installs it for that
call only (`mlora.model.context`) and returns the logits with the MixLoRA router logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from mlora.config import LoraConfig, MixLoraConfig, adapter_name_problem
from mlora.errors import MloraError
from mlora.model.context import AdapterContext, BatchLayout, RouterLogits
from mlora.model.lora import LoraLinear
from mlora.model.mixlora import FFN_PROJECTIONS, MixLoraFFN

_WRAPPER_PARTS = re.compile(r"\.(base_mlp|base_layer)(?=\.|$)")


class AdapterError(MloraError, ValueError):
    """An adapter cannot be added to (or found on) this model; the message says why."""


@dataclass
class AdaptedOutput:
    """What `MultiAdapterModel.forward` returns.

    Attributes:
        logits: ``(B, T, vocab)`` in the base model's dtype.
        router_logits: adapter name -> list over MixLoRA layers of ``(logits (N, E) fp32,
            token mask (N,) bool | None)``, collected during this forward only; empty for
            LoRA-only batches. `mlora.model.router.router_aux_loss` turns an entry into a loss.
    """

    logits: torch.Tensor
    router_logits: RouterLogits


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` long positions counting real tokens only, from a ``(B, T)`` attention mask.

    A row's real tokens get positions 0..n-1 whatever padding surrounds them (left padding
    included), so a padded row computes what it computes alone, as transformers' ``generate``
    counts them. Padding keeps its column index: it is never attended to, and a right-padded
    batch gets exactly transformers' default positions.
    """
    mask = attention_mask.long()
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), mask.cumsum(-1) - 1, columns)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` for Llama)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise AdapterError(f"{type(model).__name__}: no decoder 'layers' list found; "
                       "mlora supports models whose decoder layers live in a `layers` ModuleList")


def _parent_and_attr(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


def _find_projection(layer: nn.Module, target: str) -> str | None:
    """Path inside `layer` of the module named `target` (``self_attn.q_proj``), or None."""
    for path, module in layer.named_modules():
        if path.rsplit(".", 1)[-1] == target and not path.endswith("base_layer"):
            if isinstance(module, LoraLinear) or hasattr(module, "in_features"):
                return path
    return None


def lora_kwargs(cfg: LoraConfig) -> dict:
    """The `LoraAdapter` keyword arguments of an adapter config (attention / plain LoRA)."""
    return dict(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, lora_init=cfg.lora_init)


class MultiAdapterModel(nn.Module):
    """A frozen transformers causal LM plus any number of named adapters.

    Every base parameter is frozen on construction; only adapter parameters train.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.context = AdapterContext()
        self.configs: dict[str, LoraConfig] = {}

    # ----------------------------------------------------------------- adapters
    def add_adapter(self, cfg: LoraConfig, *, seed: int | None = None) -> None:
        """Inject adapter `cfg.name` (a `LoraConfig` or `MixLoraConfig`) into every layer.

        `seed` makes the initial weights reproducible without touching the global RNG.
        Raises `AdapterError` for a duplicate name or a target module the model lacks.
        """
        if cfg.name in self.configs:
            raise AdapterError(f"adapter {cfg.name!r} is already loaded")
        problem = adapter_name_problem(cfg.name)
        if problem:
            raise AdapterError(problem)
        layers = decoder_layers(self.model)
        missing = [t for t in cfg.target_modules if _find_projection(layers[0], t) is None]
        if missing:
            names = sorted({p.rsplit(".", 1)[-1] for p, m in layers[0].named_modules()
                            if hasattr(m, "in_features") and not p.endswith("base_layer")})
            raise AdapterError(f"adapter {cfg.name!r}: target module(s) {missing} not found in "
                               f"{type(self.model).__name__}; available: {names}")
        _check_ranks(cfg, layers[0])  # before allocating: a huge r would take all memory first
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        self.configs[cfg.name] = cfg
        try:
            with rng:
                if seed is not None:
                    torch.manual_seed(seed)
                for index, layer in enumerate(layers):
                    self._add_to_layer(cfg, index, layer)
        except ValueError as err:
            self.remove_adapter(cfg.name)  # leave no half-injected adapter behind
            raise AdapterError(f"adapter {cfg.name!r}: {err}") from err

    def _add_to_layer(self, cfg: LoraConfig, index: int, layer: nn.Module) -> None:
        moe_here = isinstance(cfg, MixLoraConfig) and _has_experts(cfg, index)
        for target in cfg.target_modules:
            if moe_here and target in FFN_PROJECTIONS:
                continue  # the experts carry the FFN LoRA
            self._wrap(layer, _find_projection(layer, target)).add(cfg.name, **lora_kwargs(cfg))
        if moe_here:
            mlp_path = _find_mlp(layer)
            parent, attr = _parent_and_attr(layer, mlp_path)
            ffn = getattr(parent, attr)
            if not isinstance(ffn, MixLoraFFN):
                ffn = MixLoraFFN(ffn, self.context)
                setattr(parent, attr, ffn)
            ffn.add(cfg)

    def _wrap(self, layer: nn.Module, path: str) -> LoraLinear:
        parent, attr = _parent_and_attr(layer, path)
        module = getattr(parent, attr)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module, self.context)
            setattr(parent, attr, module)
        return module

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` everywhere; wrappers left with no adapter are unwrapped."""
        if name not in self.configs:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {list(self.configs)})")
        for path, module in list(self.model.named_modules()):
            if isinstance(module, (LoraLinear, MixLoraFFN)) and module.remove(name):
                parent, attr = _parent_and_attr(self.model, path)
                setattr(parent, attr, module.base_module)
        del self.configs[name]

    def adapter_modules(self, name: str) -> dict[str, nn.Module]:
        """Path of each wrapper (``model.layers.0.self_attn.q_proj``) -> adapter `name`'s module there."""
        found = {}
        for path, module in self.model.named_modules():
            # Paths as transformers names the modules: other adapters' wrappers (a MixLoRA FFN
            # around a LoRA-wrapped projection) must not change this adapter's keys or files.
            path = _WRAPPER_PARTS.sub("", path)
            if isinstance(module, LoraLinear) and name in module.adapters:
                found[path] = module.adapters[name]
            elif isinstance(module, MixLoraFFN) and name in module.moes:
                found[path] = module.moes[name]
        return found

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s trainable parameters, keyed ``<wrapper path>.<param>``."""
        return {f"{path}.{pname}": p for path, module in self.adapter_modules(name).items()
                for pname, p in module.named_parameters()}

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                layout: BatchLayout | None = None) -> AdaptedOutput:
        """Run the shared base once over a mixed batch.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 on real tokens and 0 on padding, or None. Positions
                count real tokens only (`position_ids`): left padding shifts nothing.
            layout: which rows belong to which adapter, installed for this call only; None
                runs the bare base (or the context's default adapter). A layout without a
                token mask gets ``attention_mask``'s.
        Returns:
            `AdaptedOutput` with logits ``(B, T, vocab)`` and this call's MixLoRA router logits.
        """
        positions = None
        if attention_mask is not None:
            positions = position_ids(attention_mask)
            if layout is not None and layout.token_mask is None:
                layout = dataclasses.replace(layout, token_mask=attention_mask.bool())
        with self.context.scope(layout) as scope:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False)
        return AdaptedOutput(out.logits, scope.router_logits)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward, under the scope of the forward it replays."""
        self.model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=self.context.checkpoint_fn)
        self.model.config.use_cache = False


def _check_ranks(cfg: LoraConfig, layer: nn.Module) -> None:
    """A LoRA rank above a projection's smaller side adds nothing but memory: refuse it."""
    from mlora.model.quant import linear_features

    moe = isinstance(cfg, MixLoraConfig)
    expert_r = cfg.expert_settings().r if moe else cfg.r
    for target in cfg.target_modules:
        module = layer.get_submodule(_find_projection(layer, target))
        if isinstance(module, LoraLinear):
            module = module.base_layer
        width = min(linear_features(module))
        moe_ffn = moe and target in FFN_PROJECTIONS
        r, key = (expert_r, "expert_lora.r" if cfg.expert_lora is not None else "r") if moe_ffn else (cfg.r, "r")
        if r > width:
            raise AdapterError(f"adapter {cfg.name!r}: {key} = {r} exceeds the width of {target} "
                               f"({'x'.join(map(str, linear_features(module)))}); a LoRA rank can be at most "
                               f"{width} there: lower {key}")


def _has_experts(cfg: MixLoraConfig, layer_index: int) -> bool:
    """MixLoRA `sparse_step`: experts only on every n-th layer (plain LoRA FFN elsewhere)."""
    return not cfg.sparse_step or layer_index % cfg.sparse_step == 0


def _find_mlp(layer: nn.Module) -> str:
    for path, module in layer.named_children():
        if isinstance(module, MixLoraFFN) or all(hasattr(module, p) for p in FFN_PROJECTIONS):
            return path
    raise AdapterError(f"{type(layer).__name__}: no gate/up/down FFN found for MixLoRA experts")
