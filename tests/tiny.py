"""Tiny random Hugging Face models and a word-level tokenizer, built in-process.

Nothing here downloads: every model is built from a config with random weights, and the
tokenizer's vocabulary is a fixed word list. Used by the model, trainer and evaluation
tests.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gemma2")

_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
}

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = (
    "a b c d e the is of to and in what which who yes no true false question answer "
    "choices options passage sentence goal solution context because so then it he she "
    "they we you red blue green water fire tree sky cat dog bird fish sun moon rain "
    "cold hot big small fast slow up down left right day night food eat drink run walk "
    "### instruction input response below write task that request appropriately "
    "completes describes an with : . , ? ! _ 1 2 3 4 A B C D E"
).split()


def tiny_model(arch: str = "llama", *, hidden: int = 32, layers: int = 2, vocab: int | None = None,
               seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight causal LM of family `arch` with a handful of parameters.

    Heads are 4 with 2 key/value heads (grouped-query attention), intermediate size is
    twice the hidden size, and the vocabulary matches `word_tokenizer()` by default.
    """
    if vocab is None:
        vocab = len(SPECIAL_TOKENS) + len(WORDS)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    if arch in ("gemma", "gemma2"):
        kwargs["head_dim"] = hidden // 4
    if arch == "gemma2":
        kwargs["sliding_window"] = 64
    kwargs.update(overrides)
    config = _CONFIGS[arch](**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init of HF models is small (std 0.02); widen it so that LoRA deltas and
    # routing differences show up clearly in logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def word_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `WORDS` (ids 0..3 are pad, unk, bos, eos)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )
    return fast


def save_tiny(model, tokenizer, folder) -> str:
    """Save a tiny model and tokenizer as a local Hugging Face folder; returns its path."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
