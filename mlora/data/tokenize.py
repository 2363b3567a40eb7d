"""(prompt, target) text -> token ids with a loss mask, and padding rows of ids into a batch.

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
from typing import Literal, NamedTuple, Protocol

import torch

from mlora.data.errors import DataError
from mlora.data.items import TrainingExample

IGNORE_INDEX = -100

Side = Literal["left", "right"]


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


class Padded(NamedTuple):
    """Rows of token ids padded to one width (`pad_rows`).

    Attributes:
        values: ``(B, T)`` long, each row's ids at columns ``[offsets[b], offsets[b] + len)``,
            the pad value elsewhere; ``T`` is the longest row's length.
        mask: ``(B, T)`` bool, True on the row's own ids, False on padding.
        offsets: the column where each row's ids start (0 for a right-padded row).
    """

    values: torch.Tensor
    mask: torch.Tensor
    offsets: list[int]


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int,
             side: Side | Sequence[Side] = "right") -> Padded:
    """Pad rows of ids to the longest one: the one padding rule of training, evaluation and generation.

    Args:
        rows: B >= 1 rows of ids (token ids, or labels); rows may differ in length.
        pad_value: written into padding (a pad token id, or -100 for labels).
        side: ``"right"`` (padding after the ids, for training) or ``"left"`` (before them, so
            each row's last id sits in the last column, for generation and scoring); one side
            for all rows or one per row. Rows padded with the same sides line up: labels
            padded like their ids stay under them.
    Returns:
        `Padded` ``(values (B, T) long, mask (B, T) bool, offsets)``.
    """
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    sides = [side] * len(rows) if isinstance(side, str) else list(side)
    if len(sides) != len(rows) or any(s not in ("left", "right") for s in sides):
        raise ValueError(f"side must be 'left' or 'right' (or one of them per row), got {side!r}")
    lengths = [len(row) for row in rows]
    width = max(lengths)
    offsets = [width - n if s == "left" else 0 for n, s in zip(lengths, sides)]
    start = torch.tensor(offsets)[:, None]
    columns = torch.arange(width)[None, :]
    mask = (columns >= start) & (columns < start + torch.tensor(lengths)[:, None])
    values = torch.full((len(rows), width), pad_value, dtype=torch.long)
    # Row-major order of the mask's True entries is the rows' ids one after another.
    values[mask] = torch.tensor([t for row in rows for t in row], dtype=torch.long)
    return Padded(values, mask, offsets)
