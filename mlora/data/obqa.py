"""OpenBookQA (allenai/openbookqa, "main" subset).

Rows: `question_stem`, `choices` {text, label}, `answerKey`; the same layout as ARC with the
question under a different name. The open-book fact is not part of the "main" subset.

loglikelihood: lm-eval's `openbookqa`: the bare question stem as context (no "Question:" and
no answer cue), continuations " {choice text}", acc and acc_norm.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import LoglikelihoodRequests, MultipleChoiceItem, question_item
from mlora.data.task import Task


def parse_obqa(task: str, row) -> MultipleChoiceItem:
    """Question: {question_stem} / A. .. D. / Answer: -> " {letter}"."""
    question = fields.text(row, "question_stem")
    texts, labels = fields.labelled_choices(row, "choices")
    answer = fields.keyed_answer(row, "answerKey", labels)
    raw_texts, _ = fields.labelled_choices(row, "choices", strip=False)
    requests = LoglikelihoodRequests.shared_context(fields.text(row, "question_stem", strip=False), raw_texts, answer)
    return question_item(task, f"Question: {question}", texts, answer, requests)


TASKS = (
    Task(
        "obqa", "allenai/openbookqa", "main", "train", "test",
        ("question_stem", "choices", "answerKey"), parse_obqa, "openbookqa",
    ),
)
