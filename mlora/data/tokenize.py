"""(prompt, target) text -> token ids with a loss mask, and padding into a batch.

Boundary rule. The prompt and the whole text are tokenized separately, the same way
(`add_special_tokens=True`, so a BOS is in both), and the target's tokens are those of the
whole text after the longest common prefix of the two id lists. The whole text is what the
model sees at evaluation, so the training ids match it exactly; and a token that merges
across the boundary (prompt "... cat" + target "s" -> "cats") counts as target, since the
prompt alone does not produce it. For a letter target " A" after "Answer:", the labels are
exactly the letter's token(s). Tokenizing the target on its own would break on SentencePiece
tokenizers, which give " A" alone a different first token than " A" after text.

Labels are -100 (ignored by the cross-entropy loss) on prompt tokens unless
`train_on_inputs`, and on padding always. The usual causal-LM shift (logits at t predict
labels at t + 1) is left to the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from mlora.data.errors import DataError
from mlora.data.items import TrainingExample

IGNORE_INDEX = -100


class Tokenizer(Protocol):
    """What is needed of a tokenizer: a Hugging Face `PreTrainedTokenizerBase` fits."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids; `labels[t]` is `input_ids[t]` or -100 (no loss).

    `input_ids` and `labels` are lists of the same length (at most `cutoff_len`).
    """

    task: str
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TokenizedExamples:
    """The result of `tokenize_examples`.

    Attributes:
        examples: the tokenized examples, in input order.
        num_truncated: how many examples were longer than `cutoff_len` and cut at the right.
        num_dropped: how many of those lost every target token to the cut; they would train
            nothing, so they are left out of `examples` (and counted here to be reported).
    """

    examples: list[TokenizedExample]
    num_truncated: int
    num_dropped: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_ids(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of `context + continuation`, split at the boundary rule of this module.

    Returns (context_ids, continuation_ids); their concatenation is the tokenization of the
    whole text. Evaluation uses it so that it scores exactly the tokens training targeted:
    for a `choice` item, `split_ids(tok, item.prompt, item.label_targets[i])[1][0]` is the
    token of letter i and `context_ids` the input whose last position predicts it; for
    `loglikelihood`, the continuation ids of each (context, continuation) request.
    """
    prompt_ids = list(tokenizer.encode(context, add_special_tokens=True))
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=True))
    boundary = _common_prefix(prompt_ids, whole)
    return whole[:boundary], whole[boundary:]


def tokenize_example(
    tokenizer: Tokenizer, example: TrainingExample, cutoff_len: int, train_on_inputs: bool = False
) -> tuple[TokenizedExample, bool]:
    """Tokenize one example; returns it and whether it was truncated to `cutoff_len`.

    EOS is appended when `example.add_eos` (instruction data) unless the tokenizer already
    ends the text with it. Truncation keeps the first `cutoff_len` tokens.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}")
    context_ids, target_ids = split_ids(tokenizer, example.prompt, example.target)
    boundary = len(context_ids)
    input_ids = context_ids + target_ids
    if example.add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("The tokenizer has no EOS token, which instruction ('casual') data needs.")
        if not input_ids or input_ids[-1] != eos:
            input_ids.append(eos)
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * boundary + input_ids[boundary:]
    truncated = len(input_ids) > cutoff_len
    return TokenizedExample(example.task, input_ids[:cutoff_len], labels[:cutoff_len]), truncated


def tokenize_examples(
    tokenizer: Tokenizer, examples: Iterable[TrainingExample], cutoff_len: int, train_on_inputs: bool = False
) -> TokenizedExamples:
    """Tokenize every example (see `tokenize_example`), counting truncated and dropped ones."""
    kept: list[TokenizedExample] = []
    truncated = dropped = 0
    for example in examples:
        tokenized, was_truncated = tokenize_example(tokenizer, example, cutoff_len, train_on_inputs)
        truncated += was_truncated
        if all(label == IGNORE_INDEX for label in tokenized.labels):
            dropped += 1
            continue
        kept.append(tokenized)
    return TokenizedExamples(kept, truncated, dropped)


def collate(
    examples: Sequence[TokenizedExample], pad_id: int, padding_side: Literal["left", "right"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples to the longest one and stack them.

    Args:
        examples: B >= 1 tokenized examples.
        pad_id: the id written into padding positions of `input_ids`.
        padding_side: "right" (padding after the tokens, for training) or "left" (before
            them, so the last position is each row's last token, for generation/scoring).

    Returns:
        {"input_ids": (B, T) long, "attention_mask": (B, T) long (1 = token, 0 = padding),
         "labels": (B, T) long, -100 on padding}, with T the longest example's length.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        columns = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[row, columns] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, columns] = 1
        labels[row, columns] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
