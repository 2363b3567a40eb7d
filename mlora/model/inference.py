"""The inference API: a transformers model with one saved adapter applied.

    from mlora import MixLoraModelForCausalLM
    from transformers import AutoTokenizer

    model, config = MixLoraModelForCausalLM.from_pretrained("output/arc_c_0")  # or a Hub id
    tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
    logits = model(input_ids).logits

Works for every adapter type mlora trains (LoRA, DoRA, MixLoRA, MixDoRA) and for PEFT
LoRA folders. The returned model is a plain transformers causal LM (generate() works) in
eval mode, so dropout and router jitter are off and two forwards give identical logits.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlora.hub import resolve_adapter
from mlora.io import AdapterFileError, default_name, load_adapter, read_adapter_config
from mlora.model.adapted import MultiAdapterModel
from mlora.model.loading import load_base_model, resolve_dtype


class MixLoraModelForCausalLM:
    """Loader only (no instances): see `from_pretrained`."""

    @staticmethod
    def from_pretrained(name_or_path, base_model=None, torch_dtype=None, device=None):
        """Load the base model and apply the adapter `name_or_path` names.

        Args:
            name_or_path: folder with ``adapter_config.json`` and the adapter weights, or a
                Hugging Face Hub id (``owner/name``), read from the hub cache when it is there
                (or HF_HUB_OFFLINE is set), else downloaded (`mlora.hub`); the base model likewise.
            base_model: hub id, local folder or ``.gguf`` path overriding the
                ``base_model_name_or_path`` stored in the adapter config; or an already
                loaded transformers model (its weights are then frozen and wrapped in place).
            torch_dtype: ``fp32`` | ``bf16`` | ``fp16`` | torch dtype for the base (default fp32).
            device: where to load the base (default: CUDA if available, else CPU).
        Returns:
            ``(model, config)``: the adapted transformers model and the adapter's config
            (`mlora.config.LoraConfig` or `MixLoraConfig`: ``r``, ``lora_alpha``,
            ``target_modules``, ``num_experts``, ``top_k``, ``routing_strategy``, ``act_fn``, ...,
            plus ``peft_type`` and ``task_type`` as in the file). ``config.base_model_name_or_path``
            is the base actually loaded, the name to give ``AutoTokenizer.from_pretrained``: the
            ``base_model`` argument when given, else the adapter config's; for a ``.gguf`` file,
            the folder it was converted into (it holds the tokenizer too).
        Raises:
            AdapterFileError: the adapter cannot be found (`AdapterNotFoundError`), or its folder
                is malformed.
            ModelLoadError: the base model cannot be loaded.
        """
        folder = resolve_adapter(name_or_path)
        # Named after what the caller gave: a hub snapshot folder is named by a commit hash.
        cfg, stored_base = read_adapter_config(folder, name=default_name(Path(os.fspath(name_or_path))))
        base = base_model if base_model is not None else stored_base
        if base is None:
            raise AdapterFileError(f"{name_or_path}: adapter_config.json names no base model; "
                                   "pass base_model=... (a hub id, folder or .gguf file)")
        if isinstance(base, (str, Path)):
            model, _ = load_base_model(str(base), dtype=torch_dtype, device=device)
        else:
            model = base.to(device=device, dtype=torch_dtype and resolve_dtype(torch_dtype))
        adapted = MultiAdapterModel(model)
        load_adapter(adapted, folder, cfg)
        adapted.context.default_adapter = cfg.name
        cfg.base_model_name_or_path = model.config.name_or_path or stored_base
        return model.eval(), cfg
