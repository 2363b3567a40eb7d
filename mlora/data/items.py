"""The item and example types shared by every task, and the prompt layout of each protocol.

Every benchmark row becomes one `MultipleChoiceItem` holding the strings both protocols need:

* `choice` (the MixLoRA paper's protocol, the default): `prompt` lists the options with
  letters and ends with "Answer:"; the training target is " " + the answer's letter; the
  evaluator compares the logits of this item's own letters at the position after `prompt`.
* `loglikelihood` (lm-evaluation-harness): `item.loglikelihood` holds exactly the requests
  lm-eval's matching task makes for the row (its context and continuation strings, its
  choice order and its gold index, quirks included); the training target is the right
  continuation after its context, and the evaluator sums log P(continuation | context) for
  every choice. Contexts are equal except for WinoGrande, whose option sits inside the
  context (the continuation is the shared rest of the sentence).

Continuations and letter targets start with a space so that prompt + target reads as text;
`mlora.data.tokenize` finds the token boundary by tokenizing the prompt and the whole.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from mlora.config import PROTOCOLS, Protocol  # defined with the config key that takes them

LETTERS = tuple(string.ascii_uppercase)
ANSWER_CUE = "Answer:"
TARGET_DELIMITER = " "  # lm-eval's default `target_delimiter`, between a context and each choice


@dataclass(frozen=True)
class TrainingExample:
    """One supervised example: the loss covers `target` only (unless train_on_inputs).

    `add_eos` asks the tokenizer step to append the EOS token to the target: set for
    instruction data, whose answers are open-ended, and not for benchmark targets, which
    are one letter or one option and are scored at their own tokens.
    """

    task: str
    prompt: str
    target: str
    add_eos: bool = False


@dataclass(frozen=True)
class LoglikelihoodRequests:
    """One item as lm-evaluation-harness's task asks for it: choice i is scored by
    log P(continuations[i] | contexts[i]).

    Attributes:
        contexts: the context of each choice; all equal except for WinoGrande (lm-eval's
            "multiple input" task, where each option ends its own context).
        continuations: each choice's continuation, starting with lm-eval's target delimiter.
        answer: index of the right choice in this order (which may differ from the `choice`
            protocol's order: BoolQ is "no", "yes" here and "yes", "no" there).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        n = len(self.continuations)
        if n < 2 or len(self.contexts) != n:
            raise ValueError(f"{len(self.contexts)} contexts and {n} continuations; need the same number (at least 2)")
        if not 0 <= self.answer < n:
            raise ValueError(f"answer index {self.answer} out of range for {n} choices")

    @classmethod
    def shared_context(cls, context: str, choices: Sequence[str], answer: int) -> LoglikelihoodRequests:
        """lm-eval's usual layout: one context, then the delimiter and each choice."""
        return cls((context,) * len(choices), tuple(TARGET_DELIMITER + choice for choice in choices), answer)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(context, continuation) for every choice, in lm-eval's choice order."""
        return tuple(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One benchmark question with its choices, ready for either protocol.

    Attributes:
        task: registry name of the task ("arc-c", ...), kept through multi-task mixing.
        prompt: `choice` protocol prompt: question, one "X. option" line per choice, then
            "Answer:"; the answer letter goes right after it.
        labels: the letters of this item's choices, "A", "B", ... (len == number of choices:
            an ARC item with 3 choices has 3 labels, never a fixed 5 or 9).
        choices: the option texts the prompt letters, in label order.
        answer: index of the correct choice among `labels`, 0 <= answer < len(labels).
        loglikelihood: the `loglikelihood` protocol's requests, in lm-eval's choice order.
    """

    task: str
    prompt: str
    labels: tuple[str, ...]
    choices: tuple[str, ...]
    answer: int
    loglikelihood: LoglikelihoodRequests

    def __post_init__(self) -> None:
        n = len(self.labels)
        if n < 2 or len(self.choices) != n or len(self.loglikelihood.continuations) != n:
            raise ValueError(
                f"{self.task}: {n} labels, {len(self.choices)} choices, "
                f"{len(self.loglikelihood.continuations)} loglikelihood requests; need the same number (at least 2)"
            )
        if not 0 <= self.answer < n:
            raise ValueError(f"{self.task}: answer index {self.answer} out of range for {n} choices")

    @property
    def label_targets(self) -> tuple[str, ...]:
        """What follows `prompt` for each letter under the `choice` protocol: " A", " B", ..."""
        return tuple(" " + label for label in self.labels)

    def training_example(self, protocol: Protocol = "choice") -> TrainingExample:
        """The (prompt, target) pair the adapter is trained on under `protocol`: the strings
        that protocol scores, so training and evaluation see the same text."""
        if protocol == "choice":
            return TrainingExample(self.task, self.prompt, self.label_targets[self.answer])
        if protocol == "loglikelihood":
            requests = self.loglikelihood
            return TrainingExample(self.task, requests.contexts[requests.answer],
                                   requests.continuations[requests.answer])
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def lettered_prompt(stem: str, options: Sequence[str]) -> str:
    """`stem`, then "A. option" per option, then the answer cue, one per line."""
    lines = [stem]
    lines.extend(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    lines.append(ANSWER_CUE)
    return "\n".join(lines)


def question_item(task: str, stem: str, options: Sequence[str], answer: int,
                  loglikelihood: LoglikelihoodRequests) -> MultipleChoiceItem:
    """The common `choice` layout: a question stem, its lettered options and the answer cue."""
    return MultipleChoiceItem(
        task=task,
        prompt=lettered_prompt(stem, options),
        labels=LETTERS[: len(options)],
        choices=tuple(options),
        answer=answer,
        loglikelihood=loglikelihood,
    )
