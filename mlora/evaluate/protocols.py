"""The two protocols: what one item turns into (rows of token ids) and how its scores are read.

* ``choice`` (the MixLoRA paper's): one row per item, its lettered prompt. At the last
  position, the position that predicts the answer letter, only this item's own label tokens
  compete (an ARC item with 3 choices is scored over " A", " B", " C"). The label token ids
  come from `split_ids`, the boundary training used, so evaluation reads exactly the tokens
  training targeted (a tokenizer that writes a letter as several tokens gets the letters
  scored as sequences instead; see `choice_rows`).
* ``loglikelihood`` (lm-evaluation-harness): every (context, continuation) request of the item
  (`LoglikelihoodRequests`, lm-eval's strings and choice order) is the context followed by the
  continuation minus its last token; the continuation's summed log-probability is read at the
  positions that predict its tokens. ``acc`` takes the best sum; ``acc_norm`` (where lm-eval
  reports it) divides each sum by the length in characters of the choice, the continuation
  without its target delimiter, as lm-eval does.

Shared context. The choices of one item usually start alike: the same context, often the
same first tokens. `sequence_rows` writes such an item as one row: the tokens all its requests
share (the prefix), then each request's remaining tokens as a block that sees the prefix and
itself only, with its positions numbered on from the prefix as if it were alone. Every token
then sees exactly what it sees in its own request's row, at the same positions, so the scores
are those of one row per request, for the prefix's cost once instead of once per choice.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mlora.data import split_ids
from mlora.errors import MloraError

NO_LIMIT = sys.maxsize  # a `share_within` that lets every item share


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
    """Summed log-probability of a continuation (the batched pass computes the same for many
    continuations at once).

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
    """Characters that `acc_norm` divides by: the continuation without its joining space.

    That is lm-eval's ``len(choice)`` (its `doc_to_choice` text; characters, not bytes),
    since lm-eval's continuation is the target delimiter " " + the choice.
    """
    return max(1, len(continuation.removeprefix(" ")))


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic, as numpy's argmax)."""
    return max(range(len(values)), key=values.__getitem__)


# ----------------------------------------------------------------------------------------- rows


@dataclass
class Read:
    """One score to read from a row, for choice `choice` of the row's item.

    In a ``labels`` row: `score_choice` of the logits at ``columns[0]`` over `targets` (the
    item's label ids, one score per label). In a ``sequence`` row: the sum over j of the
    log-probability of ``targets[j]`` at ``columns[j]``.
    """

    choice: int
    columns: list[int]
    targets: list[int]


@dataclass
class Row:
    """One sequence to run, and what to read from its logits.

    `ids` is a prefix followed by `blocks` (their lengths): each block sees the prefix and
    itself, not the other blocks, and numbers its positions on from the prefix. A plain row
    has no blocks (the usual causal sequence, positions 0..n-1).
    """

    kind: str  # "labels" | "sequence"
    ids: list[int]
    reads: list[Read]
    owner: int  # index of the (spec, task) result
    item: int
    blocks: list[int] = field(default_factory=list)

    @property
    def prefix(self) -> int:
        return len(self.ids) - sum(self.blocks)

    def positions(self) -> list[int]:
        """The position of each token, as in the request the token belongs to."""
        p = self.prefix
        return list(range(p)) + [p + j for n in self.blocks for j in range(n)]

    def segments(self) -> list[int]:
        """0 for the prefix, k + 1 for block k: token i sees token j <= i iff segment j is 0 or i's."""
        return [0] * self.prefix + [k + 1 for k, n in enumerate(self.blocks) for _ in range(n)]

    def first_read(self) -> int:
        return min(read.columns[0] for read in self.reads)


def _nonempty_context(tokenizer, ids: list[int]) -> list[int]:
    # A continuation needs a position to be predicted from; the harness starts from EOS.
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EvaluationError("an empty context cannot be scored: the tokenizer has no BOS or EOS token")
    return [start]


def _request(tokenizer, choice: int, context: str, continuation: str) -> tuple[list[int], Read] | None:
    """The input ids that score `continuation` after `context`, and what to read from them;
    None if the continuation adds no token (its score stays 0)."""
    context_ids, continuation_ids = split_ids(tokenizer, context, continuation)
    if not continuation_ids:
        return None
    context_ids = _nonempty_context(tokenizer, context_ids)
    start = len(context_ids) - 1
    columns = list(range(start, start + len(continuation_ids)))
    return context_ids + continuation_ids[:-1], Read(choice, columns, continuation_ids)


def _common_prefix(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return n


def _shared_row(parts: list[tuple[list[int], Read]], owner: int, index: int) -> Row:
    """One row for several requests: their common prefix once, then each request's rest."""
    prefix = _common_prefix([ids for ids, _ in parts])
    ids, blocks, reads = list(parts[0][0][:prefix]), [], []
    for request_ids, read in parts:
        start = len(ids)
        ids += request_ids[prefix:]
        blocks.append(len(request_ids) - prefix)
        columns = [c if c < prefix else start + c - prefix for c in read.columns]
        reads.append(Read(read.choice, columns, read.targets))
    return Row("sequence", ids, reads, owner, index, blocks)


def sequence_rows(tokenizer, requests: Sequence[tuple[str, str]], owner: int, index: int,
                  share_within: int | None = None) -> list[Row]:
    """The ``sequence`` rows that score each (context, continuation) of one item.

    Requests whose continuation adds no token get no row (their score stays 0). With
    `share_within`, the item's requests share one row (see the module docstring) when there
    are several and each is at most that many tokens; otherwise, and with None, each request
    has its own plain row.
    """
    parts = [part for choice, (context, continuation) in enumerate(requests)
             if (part := _request(tokenizer, choice, context, continuation)) is not None]
    if share_within is not None and len(parts) > 1 and max(len(ids) for ids, _ in parts) <= share_within:
        return [_shared_row(parts, owner, index)]
    return [Row("sequence", ids, [read], owner, index) for ids, read in parts]


def choice_rows(tokenizer, item, owner: int, index: int, share_within: int | None = None) -> list[Row]:
    """The rows of one item under `choice`.

    Normally one ``labels`` row: the prompt, whose last position predicts the answer letter;
    `score_choice` restricts its logits to the item's letters. A tokenizer that writes a letter
    as several tokens (or merges it into the prompt's end) gets the letters scored as
    ``sequence`` rows instead (`sequence_rows`, sharing the prompt as there): each letter's
    log-likelihood after the prompt, restricted to the item's letters by a log-softmax over
    them once all are known. For one-token letters both give the same scores (the softmax
    normaliser at the shared position cancels).
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
        return [Row("labels", context, [Read(0, [len(context) - 1], [label[0] for label in labels])], owner, index)]
    return sequence_rows(tokenizer, [(item.prompt, target) for target in item.label_targets], owner, index,
                         share_within)


def loglikelihood_rows(tokenizer, item, owner: int, index: int, share_within: int | None = None) -> list[Row]:
    """Rows for one item under `loglikelihood`: its lm-eval requests (`sequence_rows`)."""
    return sequence_rows(tokenizer, item.loglikelihood.pairs(), owner, index, share_within)


def truncate_left(row: Row, max_length: int | None) -> bool:
    """Keep the last `max_length` tokens of a plain row (the harness's rule); True if it was cut.

    Shared rows are only built from requests that fit, so they are never cut.
    """
    if max_length is None or len(row.ids) <= max_length:
        return False
    if row.blocks:
        raise ValueError("a shared row is never truncated: its requests fit by construction")
    cut = len(row.ids) - max_length
    if row.first_read() < cut:
        raise EvaluationError(f"a continuation of {len(row.reads[0].targets)} tokens does not fit in "
                              f"{max_length} positions")
    row.ids = row.ids[cut:]
    for read in row.reads:
        read.columns = [c - cut for c in read.columns]
    return True
