"""PIQA (ybisk/piqa): pick the better of two solutions to a physical goal.

Rows: `goal`, `sol1`, `sol2`, `label` (0 or 1; the hidden test split uses -1, which is
rejected as out of range rather than scored).

loglikelihood: lm-eval's `piqa`: context "Question: {goal}\\nAnswer:", continuations
" {sol1}" and " {sol2}", acc and acc_norm.
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import LoglikelihoodRequests, MultipleChoiceItem, question_item
from mlora.data.task import Task

_SOLUTIONS = ("sol1", "sol2")


def parse_piqa(task: str, row) -> MultipleChoiceItem:
    """Goal: {goal} / A. {sol1} / B. {sol2} / Answer: -> " A" | " B"."""
    goal = fields.text(row, "goal")
    options = [fields.text(row, key) for key in _SOLUTIONS]
    answer = fields.index_label(row, "label", first=0, count=2)
    requests = LoglikelihoodRequests.shared_context(
        f"Question: {fields.text(row, 'goal', strip=False)}\nAnswer:",
        [fields.text(row, key, strip=False) for key in _SOLUTIONS], answer)
    return question_item(task, f"Goal: {goal}", options, answer, requests)


TASKS = (
    Task("piqa", "ybisk/piqa", None, "train", "validation", ("goal", "sol1", "sol2", "label"), parse_piqa, "piqa"),
)
