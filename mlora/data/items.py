"""The item and example types shared by every task, and the prompt layout of each protocol.

Every benchmark row becomes one `MultipleChoiceItem` holding the strings both protocols need:

* `choice` (the MixLoRA paper's protocol, the default): `prompt` lists the options with
  letters and ends with "Answer:"; the training target is " " + the answer's letter; the
  evaluator compares the logits of this item's own letters at the position after `prompt`.
* `loglikelihood` (lm-evaluation-harness): `contexts[i] + choices[i]` is choice i written
  out; the training target is the right continuation, the evaluator sums log P(choices[i] |
  contexts[i]) for every i. Contexts are equal except for WinoGrande, whose option sits
  inside the context (the continuation is the shared rest of the sentence).

Continuations and letter targets start with a space so that prompt + target reads as text;
`mlora.data.tokenize` finds the token boundary by tokenizing the prompt and the whole.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PROTOCOLS = ("choice", "loglikelihood")
Protocol = Literal["choice", "loglikelihood"]

LETTERS = tuple(string.ascii_uppercase)
ANSWER_CUE = "Answer:"


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
class MultipleChoiceItem:
    """One benchmark question with its choices, ready for either protocol.

    Attributes:
        task: registry name of the task ("arc-c", ...), kept through multi-task mixing.
        prompt: `choice` protocol prompt: question, one "X. option" line per choice, then
            "Answer:"; the answer letter goes right after it.
        labels: the letters of this item's choices, "A", "B", ... (len == number of choices:
            an ARC item with 3 choices has 3 labels, never a fixed 5 or 9).
        contexts: `loglikelihood` context for each choice (len == number of choices).
        choices: `loglikelihood` continuation for each choice, with its leading space.
        answer: index of the correct choice, 0 <= answer < len(labels).
    """

    task: str
    prompt: str
    labels: tuple[str, ...]
    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        n = len(self.labels)
        if n < 2 or len(self.contexts) != n or len(self.choices) != n:
            raise ValueError(
                f"{self.task}: {n} labels, {len(self.contexts)} contexts, {len(self.choices)} choices; "
                "need the same number (at least 2) of each"
            )
        if not 0 <= self.answer < n:
            raise ValueError(f"{self.task}: answer index {self.answer} out of range for {n} choices")

    @property
    def label_targets(self) -> tuple[str, ...]:
        """What follows `prompt` for each letter under the `choice` protocol: " A", " B", ..."""
        return tuple(" " + label for label in self.labels)

    def loglikelihood_requests(self) -> tuple[tuple[str, str], ...]:
        """(context, continuation) for every choice, in choice order."""
        return tuple(zip(self.contexts, self.choices))

    def training_example(self, protocol: Protocol = "choice") -> TrainingExample:
        """The (prompt, target) pair the adapter is trained on under `protocol`."""
        if protocol == "choice":
            return TrainingExample(self.task, self.prompt, self.label_targets[self.answer])
        if protocol == "loglikelihood":
            return TrainingExample(self.task, self.contexts[self.answer], self.choices[self.answer])
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def lettered_prompt(stem: str, options: Sequence[str]) -> str:
    """`stem`, then "A. option" per option, then the answer cue, one per line."""
    lines = [stem]
    lines.extend(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    lines.append(ANSWER_CUE)
    return "\n".join(lines)


def question_item(task: str, stem: str, options: Sequence[str], answer: int) -> MultipleChoiceItem:
    """The common layout: a question stem with options, answered by letter or by option text.

    The `loglikelihood` context is the stem followed by the answer cue, and each option is
    its continuation: "Question: ...\\nAnswer:" + " option".
    """
    context = f"{stem}\n{ANSWER_CUE}"
    return MultipleChoiceItem(
        task=task,
        prompt=lettered_prompt(stem, options),
        labels=LETTERS[: len(options)],
        contexts=(context,) * len(options),
        choices=tuple(" " + option for option in options),
        answer=answer,
    )
