"""Typed access to the fields of one dataset row.

Rows come from the hub (typed columns), parquet (typed), JSON (typed by the writer) or CSV
(everything a string), so each reader here accepts the natural type and its string form and
raises `RowError` naming the field otherwise. Nothing is guessed or defaulted: a row that
does not say what the task needs is malformed.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mlora.data.errors import RowError


def value(row: Mapping[str, Any], key: str) -> Any:
    """The raw value of `key`; a missing key or a null value is an error."""
    if not isinstance(row, Mapping):
        raise RowError(f"expected an object with named fields, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise RowError(f"missing field {key!r}")
    return row[key]


def text(row: Mapping[str, Any], key: str, allow_empty: bool = False, strip: bool = True) -> str:
    """A string field, stripped of surrounding whitespace unless `strip` is False.

    `strip=False` keeps the value exactly as stored (the `loglikelihood` strings are lm-eval's,
    which renders fields as they are); a value of blanks only still counts as empty.
    """
    raw = value(row, key)
    if not isinstance(raw, str):
        raise RowError(f"field {key!r} should be a string, got {type(raw).__name__} {raw!r}")
    stripped = raw.strip()
    if not stripped and not allow_empty:
        raise RowError(f"field {key!r} is empty")
    return stripped if strip else raw


def boolean(row: Mapping[str, Any], key: str) -> bool:
    """A boolean field; CSV files spell it "true"/"false" (any case)."""
    raw = value(row, key)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise RowError(f"field {key!r} should be true or false, got {raw!r}")


def index_label(row: Mapping[str, Any], key: str, first: int, count: int) -> int:
    """A numbered label (an int or its string) turned into a 0-based choice index.

    `first` is the number of the first choice (0 for PIQA and HellaSwag, 1 for SIQA and
    WinoGrande) and `count` the number of choices, so the valid labels are
    `first .. first + count - 1`.
    """
    raw = value(row, key)
    number = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
    elif isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        number = int(raw)
    valid = ", ".join(str(n) for n in range(first, first + count))
    if number is None or not first <= number < first + count:
        raise RowError(f"field {key!r} is {raw!r}, out of range (expected one of {valid})")
    return number - first


def _decoded(raw: Any, key: str) -> Any:
    # CSV cells hold nested fields as text; accept JSON and Python literal syntax for them.
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise RowError(f"field {key!r} holds text that is neither JSON nor a literal: {raw[:60]!r}") from None


def string_list(row: Mapping[str, Any], key: str, min_len: int = 2, strip: bool = True) -> list[str]:
    """A list of non-empty strings with at least `min_len` entries (stripped unless `strip` is False)."""
    raw = _decoded(value(row, key), key)
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise RowError(f"field {key!r} should be a list of strings, got {type(raw).__name__}")
    items = list(raw)
    if len(items) < min_len:
        raise RowError(f"field {key!r} has {len(items)} entries, expected at least {min_len}")
    out = []
    for position, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise RowError(f"field {key!r} entry {position} should be a non-empty string, got {item!r}")
        out.append(item.strip() if strip else item)
    return out


def labelled_choices(row: Mapping[str, Any], key: str = "choices", strip: bool = True) -> tuple[list[str], list[str]]:
    """The `{"text": [...], "label": [...]}` struct of ARC and OpenBookQA.

    Returns (texts, labels) of equal length (2 to 26 choices); labels are compared as
    strings because the datasets mix "A".."E" with "1".."4". Texts are stripped unless
    `strip` is False; labels always are.
    """
    raw = _decoded(value(row, key), key)
    if not isinstance(raw, Mapping) or "text" not in raw or "label" not in raw:
        raise RowError(f"field {key!r} should be an object with 'text' and 'label' lists")
    texts = string_list({"text": raw["text"]}, "text", strip=strip)
    labels = [label.strip() for label in string_list({"label": raw["label"]}, "label")]
    if len(texts) != len(labels):
        raise RowError(f"field {key!r} has {len(texts)} texts but {len(labels)} labels")
    if len(set(labels)) != len(labels):
        raise RowError(f"field {key!r} repeats a label: {labels}")
    if len(labels) > 26:
        raise RowError(f"field {key!r} has {len(labels)} choices; at most 26 can be lettered")
    return texts, labels


def keyed_answer(row: Mapping[str, Any], key: str, labels: Sequence[str]) -> int:
    """The index of the answer key (e.g. `answerKey` "C" or "3") among `labels`."""
    raw = value(row, key)
    answer = str(raw).strip()
    if answer not in labels:
        raise RowError(f"field {key!r} is {raw!r}, not one of the choice labels {', '.join(labels)}")
    return list(labels).index(answer)
