"""WinoGrande (allenai/winogrande, winogrande_debiased): fill the blank with one of two names.

Rows: `sentence` containing "_", `option1`, `option2`, `answer` "1" or "2" (a string).

choice: each option is the whole sentence with the blank filled in, and the model answers
with the letter of the sensible one. loglikelihood: lm-eval's `winogrande` ("partial"
scoring): choice i's context is the sentence up to the blank followed by option i, and the
continuation is " " + the rest of the sentence stripped, the same for both, so only how well
the option predicts the rest is compared. The rest is written after a space even where the
sentence has none (a blank followed by "'s" gives " 's ..."), as lm-eval does. acc only:
lm-eval reports no acc_norm for WinoGrande.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.errors import RowError
from mlora.data.items import LETTERS, TARGET_DELIMITER, LoglikelihoodRequests, MultipleChoiceItem, lettered_prompt
from mlora.data.task import Task

BLANK = "_"
QUESTION = "Which sentence makes more sense?"
_OPTIONS = ("option1", "option2")


def parse_winogrande(task: str, row) -> MultipleChoiceItem:
    """choice: "Which sentence makes more sense?" / A. {filled 1} / B. {filled 2} / Answer:."""
    sentence = fields.text(row, "sentence")
    if BLANK not in sentence:
        raise RowError(f"field 'sentence' has no blank {BLANK!r} to fill: {sentence[:60]!r}")
    options = [fields.text(row, key) for key in _OPTIONS]
    answer = fields.index_label(row, "answer", first=1, count=2)
    before, after = sentence.split(BLANK, 1)
    if not after.strip():
        raise RowError("field 'sentence' ends at the blank; nothing is left to score after it")
    raw_before, raw_after = fields.text(row, "sentence", strip=False).split(BLANK, 1)
    requests = LoglikelihoodRequests(
        contexts=tuple(raw_before + fields.text(row, key, strip=False) for key in _OPTIONS),
        continuations=(TARGET_DELIMITER + raw_after.strip(),) * 2,
        answer=answer,
    )
    filled = [before + option + after for option in options]
    return MultipleChoiceItem(
        task=task,
        prompt=lettered_prompt(QUESTION, filled),
        labels=LETTERS[:2],
        choices=tuple(filled),
        answer=answer,
        loglikelihood=requests,
    )


TASKS = (
    Task(
        "winogrande", "allenai/winogrande", "winogrande_debiased", "train", "validation",
        ("sentence", "option1", "option2", "answer"), parse_winogrande, "winogrande", ("acc",),
    ),
)
