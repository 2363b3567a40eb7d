"""ARC-Challenge and ARC-Easy (allenai/ai2_arc).

Rows: `question`, `choices` {text: [...], label: [...]}, `answerKey`. Items have 3 to 5
choices and the labels are "A".."E" or "1".."4"; prompts always letter the options A, B, C...
in the row's order and the item keeps exactly as many labels as it has choices.

loglikelihood: lm-eval's `arc_challenge` / `arc_easy`: context "Question: {question}\\nAnswer:",
continuations " {choice text}" in the row's order, acc and acc_norm.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import LoglikelihoodRequests, MultipleChoiceItem, question_item
from mlora.data.task import Task


def parse_arc(task: str, row) -> MultipleChoiceItem:
    """Question: {question} / A. .. / Answer: -> " {letter}"."""
    question = fields.text(row, "question")
    texts, labels = fields.labelled_choices(row, "choices")
    answer = fields.keyed_answer(row, "answerKey", labels)
    # lm-eval renders the fields as stored, surrounding blanks included.
    raw_texts, _ = fields.labelled_choices(row, "choices", strip=False)
    raw_question = fields.text(row, "question", strip=False)
    requests = LoglikelihoodRequests.shared_context(f"Question: {raw_question}\nAnswer:", raw_texts, answer)
    return question_item(task, f"Question: {question}", texts, answer, requests)


_FIELDS = ("question", "choices", "answerKey")

TASKS = (
    Task("arc-c", "allenai/ai2_arc", "ARC-Challenge", "train", "test", _FIELDS, parse_arc, "arc_challenge"),
    Task("arc-e", "allenai/ai2_arc", "ARC-Easy", "train", "test", _FIELDS, parse_arc, "arc_easy"),
)
