"""The one base class of every error a user can fix.

Each layer raises its own subclass (`ConfigError`, `DataError`, `AdapterFileError`, ...) with
a message that names the key, file or value and the fix; the command line catches
`MloraError` once and prints that message as one line with exit status 2, never a traceback.
A traceback is for bugs. This module imports nothing, so every layer can depend on it.
"""


class MloraError(Exception):
    """A problem with the user's input, files or environment; the message says how to fix it."""
