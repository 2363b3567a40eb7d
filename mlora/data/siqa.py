"""Social IQa (allenai/social_i_qa): reasoning about people's motives and reactions.

Rows: `context`, `question`, `answerA`, `answerB`, `answerC`, `label` "1".."3" (a string).

loglikelihood: lm-eval's `social_iqa`: context "Q: {context} {question}\\nA:", continuations
" {answerA}" .. " {answerC}", acc only.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import LoglikelihoodRequests, MultipleChoiceItem, question_item
from mlora.data.task import Task

_ANSWERS = ("answerA", "answerB", "answerC")


def parse_siqa(task: str, row) -> MultipleChoiceItem:
    """{context} / Question: {question} / A. .. C. / Answer: -> " {letter}"."""
    context = fields.text(row, "context")
    question = fields.text(row, "question")
    options = [fields.text(row, key) for key in _ANSWERS]
    answer = fields.index_label(row, "label", first=1, count=3)
    requests = LoglikelihoodRequests.shared_context(
        f"Q: {fields.text(row, 'context', strip=False)} {fields.text(row, 'question', strip=False)}\nA:",
        [fields.text(row, key, strip=False) for key in _ANSWERS], answer)
    return question_item(task, f"{context}\nQuestion: {question}", options, answer, requests)


TASKS = (
    Task(
        "siqa", "allenai/social_i_qa", None, "train", "validation",
        ("context", "question", *_ANSWERS, "label"), parse_siqa, "social_iqa", ("acc",),
    ),
)
