"""WinoGrande (allenai/winogrande, winogrande_debiased): fill the blank with one of two names.

Rows: `sentence` containing "_", `option1`, `option2`, `answer` "1" or "2" (a string).

choice: each option is the whole sentence with the blank filled in, and the model answers
with the letter of the sensible one. loglikelihood (the lm-evaluation-harness "partial"
scoring): choice i's context is the sentence up to the blank filled with option i, and the
continuation is the rest of the sentence, the same for both, so only how well the option
predicts the rest is compared.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.errors import RowError
from mlora.data.items import LETTERS, MultipleChoiceItem, lettered_prompt
from mlora.data.task import Task

BLANK = "_"
QUESTION = "Which sentence makes more sense?"


def parse_winogrande(task: str, row) -> MultipleChoiceItem:
    """choice: "Which sentence makes more sense?" / A. {filled 1} / B. {filled 2} / Answer:."""
    sentence = fields.text(row, "sentence")
    if BLANK not in sentence:
        raise RowError(f"field 'sentence' has no blank {BLANK!r} to fill: {sentence[:60]!r}")
    options = [fields.text(row, "option1"), fields.text(row, "option2")]
    answer = fields.index_label(row, "answer", first=1, count=2)
    before, after = sentence.split(BLANK, 1)
    if not after.strip():
        raise RowError("field 'sentence' ends at the blank; nothing is left to score after it")
    contexts = tuple(before + option for option in options)
    return MultipleChoiceItem(
        task=task,
        prompt=lettered_prompt(QUESTION, [context + after for context in contexts]),
        labels=LETTERS[:2],
        contexts=contexts,
        # The rest of the sentence as written (it normally starts with a space), so that
        # context + continuation is exactly the filled sentence.
        choices=(after, after),
        answer=answer,
    )


TASKS = (
    Task(
        "winogrande", "allenai/winogrande", "winogrande_debiased", "train", "validation",
        ("sentence", "option1", "option2", "answer"), parse_winogrande,
    ),
)
