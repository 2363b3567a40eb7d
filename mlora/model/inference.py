"""The inference API: a transformers model with one saved adapter applied.

    from mlora import MixLoraModelForCausalLM
    model, config = MixLoraModelForCausalLM.from_pretrained("output/arc_c_0")
    logits = model(input_ids).logits

Works for every adapter type mlora trains (LoRA, DoRA, MixLoRA, MixDoRA) and for PEFT
LoRA folders. The returned model is a plain transformers causal LM (generate() works) in
eval mode, so dropout and router jitter are off and two forwards give identical logits.
"""

from __future__ import annotations

from pathlib import Path

from mlora.io import AdapterFileError, load_adapter, read_adapter_config
from mlora.model.adapted import MultiAdapterModel
from mlora.model.loading import load_base_model, resolve_dtype


class MixLoraModelForCausalLM:
    """Loader only (no instances): see `from_pretrained`."""

    @staticmethod
    def from_pretrained(adapter_dir, base_model=None, torch_dtype=None, device=None):
        """Load the base model and apply the adapter saved in `adapter_dir`.

        Args:
            adapter_dir: folder with ``adapter_config.json`` and the adapter weights.
            base_model: hub id, local folder or ``.gguf`` path overriding the
                ``base_model_name_or_path`` stored in the adapter config; or an already
                loaded transformers model (its weights are then frozen and wrapped in place).
            torch_dtype: ``fp32`` | ``bf16`` | ``fp16`` | torch dtype for the base (default fp32).
            device: where to load the base (default: CUDA if available, else CPU).
        Returns:
            ``(model, config)``: the adapted transformers model and the adapter's config.
        Raises:
            AdapterFileError: the folder is missing or malformed.
        """
        cfg, stored_base = read_adapter_config(Path(adapter_dir))
        base = base_model if base_model is not None else stored_base
        if base is None:
            raise AdapterFileError(f"{adapter_dir}: adapter_config.json names no base model; "
                                   "pass base_model=... (a hub id, folder or .gguf file)")
        if isinstance(base, (str, Path)):
            model, _ = load_base_model(str(base), dtype=torch_dtype, device=device)
        else:
            model = base.to(device=device, dtype=torch_dtype and resolve_dtype(torch_dtype))
        adapted = MultiAdapterModel(model)
        load_adapter(adapted, adapter_dir, cfg)
        adapted.context.default_adapter = cfg.name
        return model.eval(), cfg
