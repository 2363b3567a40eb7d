"""Helpers for the data tests: fixture paths and word-level tokenizers built in-process."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

SPECIALS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}


@pytest.fixture
def fixtures() -> Path:
    """The folder holding one subfolder of hand-written rows per task."""
    return FIXTURES


def build_tokenizer(words, split_punctuation=True, bos=True, eos_in_template=False):
    """A word-level tokenizer: ids 0-3 are <pad> <unk> <s> </s>, then `words` in order.

    `split_punctuation` picks the `Whitespace` pre-tokenizer ("Answer:" -> "Answer", ":")
    over `WhitespaceSplit` (splits on spaces only, so "cat" and "cats" are different words).
    """
    vocab = dict(SPECIALS)
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    single = " ".join((["<s>"] if bos else []) + ["$A"] + (["</s>"] if eos_in_template else []))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture
def make_tokenizer():
    return build_tokenizer
