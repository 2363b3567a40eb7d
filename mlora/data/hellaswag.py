"""HellaSwag (Rowan/hellaswag): choose the most plausible continuation of a description.

Rows: `activity_label`, `ctx_a`, `ctx_b` (and their join `ctx`), `endings` (4 strings),
`label` as a STRING "0".."3" (an int is accepted too). A row without `ctx_a` may give `ctx`.

loglikelihood: lm-eval's `hellaswag`, quirks included so that the numbers compare with its
tables: the context is "{activity_label}: {ctx_a} {ctx_b.capitalize()}", and `str.capitalize`
also lowercases the rest of `ctx_b` ("he uses an iPhone" -> "He uses an iphone"); context and
endings then go through lm-eval's markup cleaning, which removes "[...]" tags but turns only
each pair of spaces into one (so a tag between spaces leaves a double space behind, and an
ending that starts with a tag keeps a leading space after the delimiter). acc and acc_norm.
A row with `ctx` only (no `ctx_a`/`ctx_b`, which lm-eval needs) takes `ctx` as it is.
"""

from __future__ import annotations

import re

from mlora.data import fields
from mlora.data.errors import RowError
from mlora.data.items import LETTERS, LoglikelihoodRequests, MultipleChoiceItem, lettered_prompt
from mlora.data.task import Task

QUESTION = "Which ending fits best?"


def clean(text: str) -> str:
    """Drop the WikiHow markup left in the released text ("[title]", "[step]", ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return re.sub(r" {2,}", " ", text).strip()


def harness_clean(text: str) -> str:
    """lm-eval's cleaning of HellaSwag text, as it is: strip, " [title]" -> ". ", drop every
    "[...]" tag, then replace each (non-overlapping) pair of spaces by one space."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _context(row) -> str:
    if row.get("ctx_a") is not None:
        # ctx_b starts the sentence the endings complete; it is stored in lower case.
        ctx_a = fields.text(row, "ctx_a")
        ctx_b = fields.text(row, "ctx_b", allow_empty=True)
        return f"{ctx_a} {ctx_b[:1].upper()}{ctx_b[1:]}".strip()
    return fields.text(row, "ctx")


def _harness_context(row) -> str:
    activity = fields.text(row, "activity_label", strip=False)
    if row.get("ctx_a") is None:
        return harness_clean(f"{activity}: {fields.text(row, 'ctx', strip=False)}")
    ctx_a = fields.text(row, "ctx_a", strip=False)
    ctx_b = fields.text(row, "ctx_b", allow_empty=True, strip=False)
    return harness_clean(f"{activity}: {ctx_a} {ctx_b.capitalize()}")


def parse_hellaswag(task: str, row) -> MultipleChoiceItem:
    """choice: "{activity}: {ctx}" / "Which ending fits best?" / A. .. D. / Answer: -> " {letter}"."""
    activity = fields.text(row, "activity_label")
    context = clean(f"{activity}: {_context(row)}")
    endings = [clean(ending) for ending in fields.string_list(row, "endings")]
    if not all(endings):
        raise RowError("field 'endings' has an ending that is empty once markup is removed")
    answer = fields.index_label(row, "label", first=0, count=len(endings))
    raw_endings = fields.string_list(row, "endings", strip=False)
    requests = LoglikelihoodRequests.shared_context(
        _harness_context(row), [harness_clean(ending) for ending in raw_endings], answer)
    return MultipleChoiceItem(
        task=task,
        prompt=lettered_prompt(f"{context}\n{QUESTION}", endings),
        labels=LETTERS[: len(endings)],
        choices=tuple(endings),
        answer=answer,
        loglikelihood=requests,
    )


TASKS = (
    Task(
        "hellaswag", "Rowan/hellaswag", None, "train", "validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"), parse_hellaswag, "hellaswag",
    ),
)
