"""PIQA (ybisk/piqa): pick the better of two solutions to a physical goal.

Rows: `goal`, `sol1`, `sol2`, `label` (0 or 1; the hidden test split uses -1, which is
rejected as out of range rather than scored).
"""

from __future__ import annotations

from mlora.data import fields
from mlora.data.items import MultipleChoiceItem, question_item
from mlora.data.task import Task


def parse_piqa(task: str, row) -> MultipleChoiceItem:
    """Goal: {goal} / A. {sol1} / B. {sol2} / Answer: -> " A" | " B"."""
    goal = fields.text(row, "goal")
    options = [fields.text(row, "sol1"), fields.text(row, "sol2")]
    answer = fields.index_label(row, "label", first=0, count=2)
    return question_item(task, f"Goal: {goal}", options, answer)


TASKS = (
    Task("piqa", "ybisk/piqa", None, "train", "validation", ("goal", "sol1", "sol2", "label"), parse_piqa),
)
