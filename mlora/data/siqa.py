"""Social IQa (allenai/social_i_qa): reasoning about people's motives and reactions.

Rows: `context`, `question`, `answerA`, `answerB`, `answerC`, `label` "1".."3" (a string).
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import MultipleChoiceItem, question_item
from mlora.data.task import Task


def parse_siqa(task: str, row) -> MultipleChoiceItem:
    """{context} / Question: {question} / A. .. C. / Answer: -> " {letter}"."""
    context = fields.text(row, "context")
    question = fields.text(row, "question")
    options = [fields.text(row, key) for key in ("answerA", "answerB", "answerC")]
    answer = fields.index_label(row, "label", first=1, count=3)
    return question_item(task, f"{context}\nQuestion: {question}", options, answer)


TASKS = (
    Task(
        "siqa", "allenai/social_i_qa", None, "train", "validation",
        ("context", "question", "answerA", "answerB", "answerC", "label"), parse_siqa,
    ),
)
