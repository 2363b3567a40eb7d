"""mlora: fine-tune many LoRA, DoRA, MixLoRA and MixDoRA adapters at once over one frozen base model."""

__version__ = "0.1.0"

__all__ = ["MixLoraModelForCausalLM", "__version__"]


def __getattr__(name):
    # Imported lazily so that `import mlora` (and the config CLI) does not pay for torch.
    if name == "MixLoraModelForCausalLM":
        from mlora.model.inference import MixLoraModelForCausalLM

        return MixLoraModelForCausalLM
    raise AttributeError(f"module 'mlora' has no attribute {name!r}")
