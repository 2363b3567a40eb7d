"""Errors raised by the data layer.

`DataError` is the one exception callers catch: its message names the dataset, the file or
row and what to do about it, so the CLI can print it without a traceback. `RowError` is
internal: a task's row parser raises it and the loader turns it into a `DataError` that
carries the row number and file.
"""

from mlora.errors import MloraError


class DataError(MloraError):
    """A dataset, file, row, template or task name the user must fix (message says how)."""


class RowError(ValueError):
    """One malformed row: a missing field, a wrong type or a label out of range."""
