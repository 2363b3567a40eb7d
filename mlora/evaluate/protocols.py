"""The two protocols: what one item turns into (rows of token ids) and how its scores are read.

* ``choice`` (the MixLoRA paper's): one row per item, its lettered prompt. At the last
  position, the position that predicts the answer letter, only this item's own label tokens
  compete (an ARC item with 3 choices is scored over " A", " B", " C"). The label token ids
  come from `split_ids`, the boundary training used, so evaluation reads exactly the tokens
  training targeted (a tokenizer that writes a letter as several tokens gets one row per
  letter instead; see `choice_rows`).
* ``loglikelihood`` (lm-evaluation-harness): one row per choice, context + continuation minus
  its last token; the continuation's summed log-probability is read at the positions that
  predict its tokens. ``acc`` takes the best sum; ``acc_norm`` divides each sum by the
  continuation's length in characters (without the space that joins it to the context, as
  the harness counts it). WinoGrande items carry one context per choice and a shared
  continuation, so they are scored the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlora.data import split_ids
from mlora.errors import MloraError


class EvaluationError(MloraError, ValueError):
    """Evaluation cannot run as asked (no benchmark tasks, unknown or missing adapter, ...)."""


# ------------------------------------------------------------------------------------ scoring


def score_choice(logits: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities of an item's own labels at the answer position.

    Args:
        logits: ``(V,)`` logits at the position that predicts the answer letter.
        label_ids: the K token ids of this item's labels (" A", " B", ...), in choice order.
    Returns:
        ``(K,)`` fp32 log-softmax over those K logits only (the other tokens do not compete).
    """
    picked = logits.float()[torch.as_tensor(list(label_ids), device=logits.device)]
    return torch.log_softmax(picked, dim=-1)


def score_loglikelihood(logits: torch.Tensor, continuation_ids: Sequence[int]) -> float:
    """Summed log-probability of a continuation.

    Args:
        logits: ``(n, V)``: row j holds the logits at the position that predicts
            ``continuation_ids[j]`` (the position of the token just before it).
        continuation_ids: the n >= 1 token ids of the continuation.
    Returns:
        ``sum_j log softmax(logits[j])[continuation_ids[j]]``, computed in fp32.
    """
    targets = torch.as_tensor(list(continuation_ids), device=logits.device)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(log_probs.gather(-1, targets[:, None]).sum())


def continuation_length(continuation: str) -> int:
    """Characters that `acc_norm` divides by: the continuation without its joining space."""
    return max(1, len(continuation.removeprefix(" ")))


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic)."""
    return max(range(len(values)), key=values.__getitem__)


# ----------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One sequence to run, and what to read from its logits.

    `positions` index `ids`. A ``labels`` row reads the logits of `targets` (an item's label
    ids, in choice order) at its single position. A ``sequence`` row reads the log-probability
    of ``targets[j]`` at ``positions[j]``, summed, for choice `choice` of its item.
    """

    kind: str  # "labels" | "sequence"
    ids: list[int]
    positions: list[int]
    targets: list[int]
    owner: int  # index of the (spec, task) result
    item: int
    choice: int = 0


def _nonempty_context(tokenizer, ids: list[int]) -> list[int]:
    # A continuation needs a position to be predicted from; the harness starts from EOS.
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EvaluationError("an empty context cannot be scored: the tokenizer has no BOS or EOS token")
    return [start]


def _sequence_row(tokenizer, context: str, continuation: str, owner: int, index: int, choice: int) -> Row | None:
    """The row that scores `continuation` after `context`; None if it adds no token (score 0)."""
    context_ids, continuation_ids = split_ids(tokenizer, context, continuation)
    if not continuation_ids:
        return None
    context_ids = _nonempty_context(tokenizer, context_ids)
    start = len(context_ids) - 1
    return Row("sequence", context_ids + continuation_ids[:-1], list(range(start, start + len(continuation_ids))),
               continuation_ids, owner, index, choice)


def choice_rows(tokenizer, item, owner: int, index: int) -> list[Row]:
    """The rows of one item under `choice`.

    Normally one ``labels`` row: the prompt, whose last position predicts the answer letter;
    `score_choice` restricts its logits to the item's letters. A tokenizer that writes a letter
    as several tokens (or merges it into the prompt's end) gets one ``sequence`` row per letter
    instead: each letter's log-likelihood after the prompt, restricted to the item's letters by
    a log-softmax over them once all are known. For one-token letters both give the same scores
    (the softmax normaliser at the shared position cancels).
    """
    splits = [split_ids(tokenizer, item.prompt, target) for target in item.label_targets]
    labels = [tuple(label) for _, label in splits]
    if any(not label for label in labels) or len(set(labels)) != len(labels):
        raise EvaluationError(
            f"{item.task}: the tokenizer gives the labels {', '.join(repr(t) for t in item.label_targets)} "
            f"the token ids {[list(label) for label in labels]} after the prompt, so the choice protocol "
            "cannot tell them apart; use --protocol loglikelihood"
        )
    if len({tuple(context) for context, _ in splits}) == 1 and all(len(label) == 1 for label in labels):
        context = _nonempty_context(tokenizer, splits[0][0])
        return [Row("labels", context, [len(context) - 1], [label[0] for label in labels], owner, index)]
    return [_sequence_row(tokenizer, item.prompt, target, owner, index, k)
            for k, target in enumerate(item.label_targets)]


def loglikelihood_rows(tokenizer, item, owner: int, index: int) -> list[Row]:
    """Rows for one item under `loglikelihood`: one per choice with a non-empty continuation."""
    rows = [_sequence_row(tokenizer, context, continuation, owner, index, k)
            for k, (context, continuation) in enumerate(item.loglikelihood_requests())]
    return [row for row in rows if row is not None]


def truncate_left(row: Row, max_length: int | None) -> bool:
    """Keep the last `max_length` tokens (the harness's rule); True if the row was cut."""
    if max_length is None or len(row.ids) <= max_length:
        return False
    cut = len(row.ids) - max_length
    if row.positions[0] < cut:
        raise EvaluationError(f"a continuation of {len(row.targets)} tokens does not fit in {max_length} positions")
    row.ids = row.ids[cut:]
    row.positions = [p - cut for p in row.positions]
    return True
