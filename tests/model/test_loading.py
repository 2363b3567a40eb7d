"""Loading the frozen base model: dtypes, freezing, clear errors."""

import pytest
import torch

from mlora.model.loading import ModelLoadError, load_base_model, resolve_dtype
from tests.tiny import save_tiny, tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tiny_model("qwen2"), word_tokenizer(), tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_dtype_loads_frozen(folder, dtype, expected):
    model, tokenizer = load_base_model(folder, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and tokenizer.pad_token is not None


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="model.gguf does not exist"):
        load_base_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelLoadError, match="dtype 'fp8' is not supported"):
        resolve_dtype("fp8")
    with pytest.raises(ModelLoadError, match="quantize '3bit' is not supported"):
        load_base_model(str(tmp_path), quantize="3bit")
