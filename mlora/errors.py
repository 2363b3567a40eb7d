"""The one base class of every error a user can fix.

Each layer raises its own subclass (`ConfigError`, `DataError`, `AdapterFileError`, ...) with
a message that names the key, file or value and the fix; the command line catches
`MloraError` once and prints that message as one line with exit status 2, never a traceback.
A traceback is for bugs. This module imports nothing, so every layer can depend on it; an
error type that two layers share lives here too, below both.
"""


def one_line(err: BaseException) -> str:
    """An error message on one line (library messages often span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


class MloraError(Exception):
    """A problem with the user's input, files or environment; the message says how to fix it."""


class AdapterFileError(MloraError, ValueError):
    """An adapter folder is missing, incomplete or does not match the model; says which file.

    Raised by both adapter file layouts (`mlora.io` for PEFT's, `mlora.model.mixlora_io` for
    the mixlora package's)."""
