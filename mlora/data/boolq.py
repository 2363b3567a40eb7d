"""BoolQ (google/boolq): a yes/no question about a passage.

Rows: `question` (lower case, no question mark), `passage`, `answer` (bool). The prompt
always carries the passage: without it the question is unanswerable (a defect of the
framework this one replaces). Options are "yes" (A) and "no" (B).
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import MultipleChoiceItem, question_item
from mlora.data.task import Task

OPTIONS = ("yes", "no")


def parse_boolq(task: str, row) -> MultipleChoiceItem:
    """{passage} / Question: {question}? / A. yes / B. no / Answer: -> " A" | " B"."""
    passage = fields.text(row, "passage")
    question = fields.text(row, "question")
    if not question.endswith("?"):
        question += "?"
    answer = 0 if fields.boolean(row, "answer") else 1
    return question_item(task, f"{passage}\nQuestion: {question}", OPTIONS, answer)


TASKS = (
    Task("boolq", "google/boolq", None, "train", "validation", ("question", "passage", "answer"), parse_boolq),
)
