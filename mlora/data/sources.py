"""Where rows come from: local files and folders, or the Hugging Face Hub.

An adapter's `data` value is one of
* None: the task's own hub dataset;
* a local file (.jsonl, .json, .parquet, .csv): one split, the one its name says
  ("arc_test.jsonl" -> test; a name that says none holds the train split);
* a local folder holding `<split>.<ext>` or shards `<split>-*.<ext>` (also in a `data/` or
  `<subset>/` subfolder, as in a hub snapshot), or one such folder per task
  (`<folder>/<task>/`), so one folder can serve a multi-task adapter;
* a hub id, optionally with a subset: "owner/name" or "owner/name:subset".

Rows are returned in `RowChunk`s that remember where each row came from, so a malformed row
is reported with its file and number. A hub dataset is loaded by `datasets` under its own
offline setting: HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE), which it reads when it is first
imported, here when the first hub dataset is asked for; then only cached copies load. Nothing
is probed and no library setting is changed.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlora.data.errors import DataError, RowError

T = TypeVar("T")

# How many malformed rows one error message lists before summarising the rest.
MAX_REPORTED_ROWS = 20

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")

# Split names and the spellings accepted for them in file names.
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}

@dataclass(frozen=True)
class RowChunk:
    """Rows from one origin (a file or a hub split).

    `line_numbers`, when set, gives each row's physical line (JSON Lines files, where blank
    lines are skipped); otherwise rows are numbered 1, 2, ... in order.
    """

    origin: str
    rows: list[Mapping[str, Any]]
    line_numbers: list[int] | None = None

    def where(self, index: int) -> str:
        """Human-readable location of row `index` (0-based) for error messages."""
        if self.line_numbers is not None:
            return f"{self.origin} line {self.line_numbers[index]}"
        return f"{self.origin} row {index + 1}"


def local_copy_hint(split: str) -> str:
    """How to point an adapter at a local copy of a dataset (shared by several messages)."""
    return (
        f'To use a local copy, set "data": "path/to/folder" for the adapter in the config, or pass '
        f"--data_path path/to/folder to `launch.py gen`; the folder holds {split}.jsonl (or .json, "
        ".parquet, .csv) in the dataset's own schema, or one such subfolder per task."
    )


# --------------------------------------------------------------------------- file readers


def _read_jsonl(path: Path) -> RowChunk:
    rows, numbers = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
            numbers.append(number)
    return RowChunk(str(path), rows, numbers)


def _read_json(path: Path) -> RowChunk:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise  # reported by read_file with the encoding advice
    except ValueError as exc:
        if "Extra data" in str(exc):
            # Many ".json" datasets are really JSON Lines; read them as such.
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({exc}).") from None
    if isinstance(content, dict):
        lists = [v for v in content.values() if isinstance(v, list)]
        if len(content) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            content = lists[0]  # {"data": [{...}, ...]}
        elif lists and len(lists) == len(content) and len({len(v) for v in lists}) == 1:
            keys = list(content)  # columns: {"question": [...], "answer": [...]}
            content = [dict(zip(keys, values)) for values in zip(*lists)]
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a JSON list of records (objects), got {type(content).__name__}.")
    for number, row in enumerate(content, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} record {number}: expected a JSON object, got {type(row).__name__}.")
    return RowChunk(str(path), content)


def _read_parquet(path: Path) -> RowChunk:
    import pyarrow
    import pyarrow.parquet  # imported here: only parquet users pay for it

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it as parquet ({type(exc).__name__}: {exc}).") from None
    return RowChunk(str(path), rows)


def _read_csv(path: Path) -> RowChunk:
    # Every cell is text: the task parsers accept "true", "1", and JSON for nested fields.
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (no header row).")
        rows = [dict(row) for row in reader]
    return RowChunk(str(path), rows)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def read_file(path: str | Path) -> RowChunk:
    """All rows of one local data file (format from its extension)."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(EXTENSIONS)}.")
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); data "
                        "files are read as UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc}).") from None


# --------------------------------------------------------------------------- local layout


def canonical_split(split: str) -> str:
    """"val" -> "validation" etc.; unknown names pass through unchanged."""
    for name, aliases in SPLIT_ALIASES.items():
        if split.lower() in aliases:
            return name
    return split


def split_named_by(path: Path) -> str | None:
    """The split a file name announces ("arc-train.jsonl" -> "train"), if any."""
    for word in re.split(r"[^a-z0-9]+", path.stem.lower()):
        for name, aliases in SPLIT_ALIASES.items():
            if word in aliases:
                return name
    return None


def _split_files(folder: Path, split: str) -> list[Path]:
    aliases = SPLIT_ALIASES.get(canonical_split(split), (split,))
    found = []
    for path in sorted(folder.iterdir()):
        stem, suffix = path.stem.lower(), path.suffix.lower()
        if not path.is_file() or suffix not in EXTENSIONS:
            continue
        if any(stem == alias or stem.startswith((alias + "-", alias + "_")) for alias in aliases):
            found.append(path)
    return found


def _local_chunks(path: Path, split: str, name: str, subset: str | None) -> list[RowChunk]:
    if path.is_file():
        holds = split_named_by(path) or "train"
        if holds != canonical_split(split):
            raise DataError(
                f"{name}: the {split!r} split was asked for, but {path} holds the {holds!r} split "
                f"(a file name that names no split holds train data). Point `data` at a folder "
                f"holding {split}.jsonl (or .json, .parquet, .csv)."
            )
        return [read_file(path)]
    if (path / name).is_dir():
        path = path / name  # one folder with a subfolder per task
    candidates = [path] + [path / sub for sub in (subset, "data") if sub and (path / sub).is_dir()]
    for folder in candidates:
        files = _split_files(folder, split)
        if files:
            return [read_file(file) for file in files]
    present = sorted(p.name for p in path.iterdir() if p.suffix.lower() in EXTENSIONS or p.is_dir())
    raise DataError(
        f"{name}: no {split!r} split in {path}: expected {split}.jsonl, {split}.json, {split}.parquet "
        f"or {split}.csv (or shards {split}-*.<ext>); found {', '.join(present) or 'nothing usable'}."
    )


def _looks_like_path(data: str) -> bool:
    return data.startswith(("/", "./", "../", "~", ".\\")) or data.lower().endswith(EXTENSIONS) or data.count("/") > 1


# --------------------------------------------------------------------------- the Hub


def _hub_chunks(
    hub_id: str, subset: str | None, split: str, name: str, trust_remote_code: bool, note: str = ""
) -> list[RowChunk]:
    import datasets  # heavy; only hub users pay for it
    import datasets.config

    described = f"{hub_id!r}" + (f" (subset {subset!r})" if subset else "") + f", split {split!r}"
    # trust_remote_code only travels when the caller asked for it (newer `datasets` refuse it).
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        dataset = datasets.load_dataset(hub_id, subset, split=split, **extra)
        rows = [dict(row) for row in dataset]
    except Exception as exc:  # the hub stack raises many types; all mean "could not load"
        if datasets.config.HF_HUB_OFFLINE:
            cause = "offline mode is on (HF_HUB_OFFLINE) and no cached copy was found"
        else:
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise DataError(
            f"{name}: could not load the dataset {described} from the Hugging Face Hub: {cause}.{note} "
            + local_copy_hint(split)
        ) from exc
    return [RowChunk(f"{hub_id}" + (f":{subset}" if subset else "") + f" [{split}]", rows)]


# --------------------------------------------------------------------------- entry point


def read_split(
    data: str | os.PathLike | None,
    split: str,
    *,
    name: str,
    hub_id: str | None,
    subset: str | None = None,
    trust_remote_code: bool = False,
) -> list[RowChunk]:
    """The rows of one split, from `data` or, when it is None, from `hub_id`/`subset`.

    Args:
        data: None, a local file or folder, or a hub id ("owner/name" or "owner/name:subset").
        split: split name ("train", "validation", "test"); also the local file name.
        name: the task name, for messages and for `<folder>/<name>/` lookup.
        hub_id, subset: the task's default source (hub_id None: `data` is required).
        trust_remote_code: passed to `datasets.load_dataset` only when True.

    Returns:
        The rows as `RowChunk`s (several when a folder holds shards), in file order.

    Raises:
        DataError: missing file or split, unreadable file, or a hub dataset that cannot be
            loaded (offline, unreachable, unknown), with how to use a local copy instead.
    """
    if data is None:
        if hub_id is None:
            raise DataError(f"{name}: no data given. {local_copy_hint(split)} A hub id works too.")
        return _hub_chunks(hub_id, subset, split, name, trust_remote_code)
    text = os.fspath(data)
    path = Path(text).expanduser()
    if path.exists():
        return _local_chunks(path, split, name, subset)
    if _looks_like_path(text):
        raise DataError(f"{name}: data path {text!r} does not exist (relative paths start at {Path.cwd()}).")
    repo, _, explicit_subset = text.partition(":")
    # A plain id keeps the task's subset only when it is the task's own dataset: a mirror
    # under another name may have no such configuration.
    chosen = explicit_subset or (subset if repo == hub_id else None)
    note = f" (There is no local file or folder {text!r} either.)"
    return _hub_chunks(repo, chosen, split, name, trust_remote_code, note)


def parse_rows(
    name: str, chunks: Sequence[RowChunk], parse: Callable[[Mapping[str, Any]], T], limit: int | None = None
) -> list[T]:
    """Apply `parse` to every row (the first `limit` rows when set), in order.

    Every malformed row (`parse` raised `RowError`) is collected and reported together in
    one `DataError` with its file and row or line number; none is dropped silently.
    """
    parsed: list[T] = []
    problems: list[str] = []
    seen = 0
    for chunk in chunks:
        for index, row in enumerate(chunk.rows):
            if limit is not None and seen >= limit:
                break
            seen += 1
            try:
                parsed.append(parse(row))
            except RowError as exc:
                problems.append(f"{chunk.where(index)}: {exc}")
    if problems:
        shown = problems[:MAX_REPORTED_ROWS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise DataError(
            f"{name}: {len(problems)} malformed row(s) (rows are numbered from 1); fix or remove them:\n  "
            + "\n  ".join(shown)
        )
    return parsed
