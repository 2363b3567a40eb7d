"""Fixtures of the trainer tests: one thread, a tiny base model on disk, small data files."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import save_tiny, tiny_model, word_tokenizer
from tests.train.helpers import OTHER_PAIRS, write_pairs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run fastest on one thread, and timing stays steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """A tiny random Llama and its word-level tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("base")
    return save_tiny(tiny_model("llama", hidden=32, layers=2), word_tokenizer(), folder)


@pytest.fixture
def pairs_file(tmp_path) -> str:
    return write_pairs(tmp_path)


@pytest.fixture
def other_pairs_file(tmp_path) -> str:
    return write_pairs(tmp_path, OTHER_PAIRS, "other.json")


