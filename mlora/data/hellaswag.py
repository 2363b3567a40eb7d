"""HellaSwag (Rowan/hellaswag): choose the most plausible continuation of a description.

Rows: `activity_label`, `ctx_a`, `ctx_b` (and their join `ctx`), `endings` (4 strings),
`label` as a STRING "0".."3" (an int is accepted too). A row without `ctx_a` may give `ctx`.
"""

from __future__ import annotations

import re

from mlora.data import fields
from mlora.data.errors import RowError
from mlora.data.items import LETTERS, MultipleChoiceItem, lettered_prompt
from mlora.data.task import Task

QUESTION = "Which ending fits best?"


def clean(text: str) -> str:
    """Drop the WikiHow markup left in the released text ("[title]", "[step]", ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return re.sub(r" {2,}", " ", text).strip()


def _context(row) -> str:
    if row.get("ctx_a") is not None:
        # ctx_b starts the sentence the endings complete; it is stored in lower case.
        ctx_a = fields.text(row, "ctx_a")
        ctx_b = fields.text(row, "ctx_b", allow_empty=True)
        return f"{ctx_a} {ctx_b[:1].upper()}{ctx_b[1:]}".strip()
    return fields.text(row, "ctx")


def parse_hellaswag(task: str, row) -> MultipleChoiceItem:
    """choice: "{activity}: {ctx}" / "Which ending fits best?" / A. .. D. / Answer: -> " {letter}".

    loglikelihood: context "{activity}: {ctx}", continuations " {ending}".
    """
    activity = fields.text(row, "activity_label")
    context = clean(f"{activity}: {_context(row)}")
    endings = [clean(ending) for ending in fields.string_list(row, "endings")]
    if not all(endings):
        raise RowError("field 'endings' has an ending that is empty once markup is removed")
    answer = fields.index_label(row, "label", first=0, count=len(endings))
    return MultipleChoiceItem(
        task=task,
        prompt=lettered_prompt(f"{context}\n{QUESTION}", endings),
        labels=LETTERS[: len(endings)],
        contexts=(context,) * len(endings),
        choices=tuple(" " + ending for ending in endings),
        answer=answer,
    )


TASKS = (
    Task(
        "hellaswag", "Rowan/hellaswag", None, "train", "validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"), parse_hellaswag,
    ),
)
