"""Evaluation results: per adapter and task, the table, and the JSON / CSV files."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlora.evaluate.protocols import argmax, continuation_length
from mlora.evaluate.replicas import Configuration, best_per_method, summarise
from mlora.run_folder import atomic_write_text

RESULTS_STEM = "eval_results"
FORMAT_VERSION = 1


@dataclass
class TaskResult:
    """One adapter on one task.

    Attributes:
        adapter, task, protocol: what was scored, and how.
        split: the split name read ("test" for ARC and OBQA, "validation" for the others).
        answers: the correct choice of each item.
        scores: per item, one score per choice: the restricted log-probability of its letter
            (choice) or the summed log-likelihood of its continuation (loglikelihood, in
            lm-eval's choice order).
        lengths: per item, the characters per choice `acc_norm` divides by (loglikelihood only).
        truncated: rows cut on the left to fit the model's positions.
        metrics: what is reported: ("acc",), or ("acc", "acc_norm") for the loglikelihood
            tasks where lm-eval reports acc_norm (`Task.metrics`); `acc_norm` is None otherwise.
    """

    adapter: str
    task: str
    protocol: str
    split: str
    answers: list[int] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    lengths: list[list[int]] = field(default_factory=list)
    truncated: int = 0
    metrics: tuple[str, ...] = ("acc",)

    def add_item(self, item) -> None:
        """Append a `MultipleChoiceItem`: its answer and choice lengths under this result's
        protocol, with every score 0 until the scores are filled in."""
        if self.protocol == "loglikelihood":
            requests = item.loglikelihood
            self.answers.append(requests.answer)
            self.lengths.append([continuation_length(c) for c in requests.continuations])
        else:
            self.answers.append(item.answer)
        self.scores.append([0.0] * len(item.labels))

    @property
    def items(self) -> int:
        return len(self.answers)

    @property
    def predictions(self) -> list[int]:
        """The chosen choice of each item (highest score)."""
        return [argmax(s) for s in self.scores]

    @property
    def norm_predictions(self) -> list[int] | None:
        """The chosen choice by score per character (None where acc_norm is not reported)."""
        if "acc_norm" not in self.metrics:
            return None
        return [argmax([s / n for s, n in zip(ss, ns)]) for ss, ns in zip(self.scores, self.lengths)]

    @property
    def correct(self) -> int:
        return sum(p == a for p, a in zip(self.predictions, self.answers))

    @property
    def acc(self) -> float:
        return self.correct / self.items if self.items else float("nan")

    @property
    def acc_norm(self) -> float | None:
        norm = self.norm_predictions
        if norm is None:
            return None
        return sum(p == a for p, a in zip(norm, self.answers)) / self.items if self.items else float("nan")

    def summary(self) -> dict:
        """The JSON record of this result (no per-item scores)."""
        return {"adapter": self.adapter, "task": self.task, "protocol": self.protocol, "split": self.split,
                "items": self.items, "correct": self.correct, "acc": self.acc, "acc_norm": self.acc_norm,
                "truncated": self.truncated}  # fmt: skip


@dataclass
class EvalResults:
    """Everything one evaluation produced; `tasks` is in adapter order, then task order.
    `configurations` groups replicas of one configuration (`mlora.evaluate.replicas`); an
    adapter in none is a configuration of its own."""

    tasks: list[TaskResult]
    model: str | None = None
    split: str = "eval"
    limit: int | None = None
    padding_side: str = "left"
    seconds: float = 0.0
    configurations: list[Configuration] = field(default_factory=list)

    @property
    def grouped(self) -> bool:
        """True when some configuration has several scored replicas (the table shows mean ± std)."""
        scored = set(self.adapters)
        return any(sum(a in scored for a in c.adapters) > 1 for c in self.configurations)

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(r.adapter for r in self.tasks))

    def result(self, adapter: str, task: str) -> TaskResult:
        for r in self.tasks:
            if r.adapter == adapter and r.task == task:
                return r
        raise KeyError(f"no result for adapter {adapter!r} on task {task!r}")

    def averages(self) -> list[dict]:
        """Per adapter: the unweighted mean over its tasks (the papers' AVG column)."""
        out = []
        for name in self.adapters:
            rows = [r for r in self.tasks if r.adapter == name]
            norms = [r.acc_norm for r in rows]
            out.append({
                "adapter": name, "protocol": "+".join(sorted({r.protocol for r in rows})), "tasks": len(rows),
                "items": sum(r.items for r in rows), "acc": sum(r.acc for r in rows) / len(rows),
                "acc_norm": None if None in norms else sum(norms) / len(rows),
            })  # fmt: skip
        return out

    def to_dict(self) -> dict:
        """The JSON document `save_results` writes::

            {"format": 1, "model": "<base model>", "split": "eval", "limit": null,
             "padding_side": "left", "created": "<UTC time>", "seconds": 12.3,
             "results": [{"adapter", "task", "protocol", "split" (the split read: "test" or
                          "validation"), "items", "correct", "acc", "acc_norm" (null where the
                          task reports none: under choice, and for boolq, siqa and winogrande,
                          which lm-eval scores by acc only), "truncated"}, ...],
             "averages": [{"adapter", "protocol", "tasks", "items", "acc", "acc_norm"}, ...],
             "configurations": [{"configuration", "method", "n", "adapters", "seeds",
                                 "tasks": {task: {"acc_mean", "acc_std", "acc_norm_mean", "acc_norm_std"}},
                                 "average": {...the same four}}, ...],
             "best": [{"method", "configuration", "acc_mean", "acc_std", "n", "runner_up",
                       "configurations"}, ...]}

        Accuracies are fractions in [0, 1]; an average is the unweighted mean over tasks (its
        acc_norm is null unless every one of the adapter's tasks has one). `results` and
        `averages` hold every replica; `configurations` their mean and sample standard deviation
        over seeds (`mlora.evaluate.replicas.summarise`), `best` the best configuration per
        method by mean average accuracy.
        """
        configurations = summarise(self, self.configurations)
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "split": self.split,
            "limit": self.limit,
            "padding_side": self.padding_side,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 3),
            "results": [r.summary() for r in self.tasks],
            "averages": self.averages(),
            "configurations": configurations,
            "best": best_per_method(configurations),
        }


# ------------------------------------------------------------------------------------- output


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(results: EvalResults) -> str:
    """The adapters x tasks table (accuracy in %, unweighted average last) as text.

    An adapter with a task that reports ``acc_norm`` (``loglikelihood`` on ARC, OBQA, PIQA,
    HellaSwag) gets a second line for it; a task without that metric, or that the adapter was
    not scored on, shows ``-``. A footer gives the item count of each task. When replicas of a
    configuration were scored (`EvalResults.grouped`), the rows are configurations instead
    (`format_grouped_table`).
    """
    if results.grouped:
        return format_grouped_table(results)
    tasks = list(dict.fromkeys(r.task for r in results.tasks))
    averages = {a["adapter"]: a for a in results.averages()}
    header = ["adapter", "metric", *tasks, "avg"]
    lines = [header]
    for name in results.adapters:
        norm = any("acc_norm" in r.metrics for r in results.tasks if r.adapter == name)
        metrics = ["acc", "acc_norm"] if norm else ["acc"]
        for metric in metrics:
            cells = []
            for task in tasks:
                try:
                    cells.append(_percent(getattr(results.result(name, task), metric)))
                except KeyError:
                    cells.append("-")
            lines.append([name if metric == "acc" else "", metric, *cells, _percent(averages[name][metric])])
    return "\n".join([_title(results), *_columns(lines, 2), _items_line(results, tasks)])


def _columns(lines: list[list[str]], left: int) -> list[str]:
    """Rows of cells as aligned text: the first `left` columns flush left, the others right."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]


def _title(results: EvalResults) -> str:
    used = sorted({r.protocol for r in results.tasks})
    return (f"evaluation: {' and '.join(used)} protocol{'s' if len(used) > 1 else ''}, split {results.split!r}"
            + (f", first {results.limit} items per task" if results.limit else "")
            + (f", model {results.model}" if results.model else ""))


def _items_line(results: EvalResults, tasks: list[str]) -> str:
    counts = []
    for task in tasks:
        sizes = sorted({r.items for r in results.tasks if r.task == task})
        split = next(r.split for r in results.tasks if r.task == task)
        counts.append(f"{task} {'/'.join(map(str, sizes))} ({split})")
    return "items: " + ", ".join(counts)


def _spread(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return _percent(mean) if std is None else f"{_percent(mean)} ± {_percent(std)}"


def format_grouped_table(results: EvalResults) -> str:
    """The configurations x tasks table: per configuration the mean ± sample standard deviation
    over its replicas (``n`` of them) of each task's accuracy and of their average, in %; then
    the best configuration of each method (highest mean average accuracy) with the runner-up.
    Every replica's own row is in the JSON and CSV (`save_results`)."""
    summaries = summarise(results, results.configurations)
    tasks = list(dict.fromkeys(r.task for r in results.tasks))
    lines = [["configuration", "n", "metric", *tasks, "avg"]]
    for s in summaries:
        has_norm = any(t["acc_norm_mean"] is not None for t in s["tasks"].values())
        for metric in ("acc", "acc_norm") if has_norm else ("acc",):
            cells = [_spread(s["tasks"][t][f"{metric}_mean"], s["tasks"][t][f"{metric}_std"]) if t in s["tasks"]
                     else "-" for t in tasks]  # fmt: skip
            avg = _spread(s["average"][f"{metric}_mean"], s["average"][f"{metric}_std"])
            first = metric == "acc"
            lines.append([s["configuration"] if first else "", str(s["n"]) if first else "", metric, *cells, avg])
    best = []
    for b in best_per_method(summaries):
        line = f"best {b['method']}: {b['configuration']} avg {_spread(b['acc_mean'], b['acc_std'])} (n={b['n']})"
        if b["runner_up"] is not None:
            r = b["runner_up"]
            line += f"; next {r['configuration']} {_spread(r['acc_mean'], r['acc_std'])} (n={r['n']})"
        best.append(line)
    note = "accuracy in %: mean ± sample standard deviation over each configuration's n seeds"
    return "\n".join([_title(results), *_columns(lines, 3), _items_line(results, tasks), *best, note])


_CSV_FIELDS = ("adapter", "task", "protocol", "split", "items", "correct", "acc", "acc_norm", "truncated")


def save_results(results: EvalResults, folder, stem: str = RESULTS_STEM) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (`EvalResults.to_dict`) and ``<stem>.csv`` into `folder`.

    The CSV has one line per adapter and task (columns: adapter, task, protocol, split, items,
    correct, acc, acc_norm, truncated) and one ``average`` line per adapter. Returns both paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    atomic_write_text(json_path, json.dumps(results.to_dict(), indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in [r.summary() for r in results.tasks]:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    for avg in results.averages():
        writer.writerow({"adapter": avg["adapter"], "task": "average", "protocol": avg["protocol"],
                         "items": avg["items"], "acc": avg["acc"],
                         "acc_norm": "" if avg["acc_norm"] is None else avg["acc_norm"]})  # fmt: skip
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path
