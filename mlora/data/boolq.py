"""BoolQ (google/boolq): a yes/no question about a passage.

Rows: `question` (lower case, no question mark), `passage`, `answer` (bool). The prompt
always carries the passage: without it the question is unanswerable (a defect of the
framework this one replaces). Options are "yes" (A) and "no" (B).

loglikelihood: lm-eval's `boolq` (super_glue): context "{passage}\\nQuestion: {question}?\\nAnswer:"
with the "?" added even after one already there, choices " no" then " yes" (so a tie goes to
"no"), acc only.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import LoglikelihoodRequests, MultipleChoiceItem, question_item
from mlora.data.task import Task

OPTIONS = ("yes", "no")
HARNESS_OPTIONS = ("no", "yes")  # lm-eval's order: its gold index is the 0/1 label


def parse_boolq(task: str, row) -> MultipleChoiceItem:
    """{passage} / Question: {question}? / A. yes / B. no / Answer: -> " A" | " B"."""
    passage = fields.text(row, "passage")
    question = fields.text(row, "question")
    if not question.endswith("?"):
        question += "?"
    word = "yes" if fields.boolean(row, "answer") else "no"
    raw_passage, raw_question = fields.text(row, "passage", strip=False), fields.text(row, "question", strip=False)
    requests = LoglikelihoodRequests.shared_context(
        f"{raw_passage}\nQuestion: {raw_question}?\nAnswer:", HARNESS_OPTIONS, HARNESS_OPTIONS.index(word))
    return question_item(task, f"{passage}\nQuestion: {question}", OPTIONS, OPTIONS.index(word), requests)


TASKS = (
    Task(
        "boolq", "google/boolq", None, "train", "validation", ("question", "passage", "answer"), parse_boolq,
        "boolq", ("acc",),
    ),
)
