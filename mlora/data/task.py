"""The `Task` record: where a benchmark's data lives and how a row becomes an item."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mlora.data.items import MultipleChoiceItem

RowParser = Callable[[str, Mapping[str, Any]], MultipleChoiceItem]


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: registry name ("arc-c").
        hub_id: Hugging Face dataset id used when no local data is given.
        subset: dataset configuration name (None when the dataset has one).
        train_split / eval_split: split names on the hub and file names in a local folder.
        fields: the row fields the parser reads, in the hub's schema (for messages/docs).
        parser: `(task name, row) -> MultipleChoiceItem`; raises `RowError` on a bad row.
        harness_task: the lm-evaluation-harness task whose requests the `loglikelihood`
            protocol reproduces ("arc_challenge").
        harness_metrics: the metrics that lm-eval task reports, and so the `loglikelihood`
            protocol ("acc" always; "acc_norm" where lm-eval has it).
    """

    name: str
    hub_id: str
    subset: str | None
    train_split: str
    eval_split: str
    fields: tuple[str, ...]
    parser: RowParser
    harness_task: str
    harness_metrics: tuple[str, ...] = ("acc", "acc_norm")

    def item(self, row: Mapping[str, Any]) -> MultipleChoiceItem:
        """Parse one row in this task's schema (raises `RowError` when malformed)."""
        return self.parser(self.name, row)

    def metrics(self, protocol: str) -> tuple[str, ...]:
        """What is reported under `protocol`: `choice` has accuracy only; `loglikelihood` has
        the metrics of lm-eval's task."""
        return self.harness_metrics if protocol == "loglikelihood" else ("acc",)

    def split_name(self, split: str) -> str:
        """Map "train" / "eval" to this task's split names; other names pass through."""
        if split == "train":
            return self.train_split
        if split == "eval":
            return self.eval_split
        return split
