"""Errors that mean "the user gave us something we can't use".

Every stage catches `AlignError`, prints its message on one line and exits
non-zero. The message must say where (file:line:field, config key, path) and
what to do about it. Anything else that escapes is a bug and keeps its
traceback.
"""


class AlignError(Exception):
    """A problem with user input or environment, explained in the message."""


class ConfigError(AlignError):
    """A config key is unknown, mistyped or out of range."""


class DataError(AlignError):
    """A data file is unreadable or a record breaks its format.

    The message starts with `file:line: field` so editors can jump to it.
    """

    def __init__(self, path, line: int | None, field: str | None, problem: str, hint: str = ""):
        where = str(path) + (f":{line}" if line is not None else "")
        what = f"{field}: {problem}" if field else problem
        message = f"{where}: {what}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
        self.path, self.line, self.field, self.problem, self.hint = str(path), line, field, problem, hint


class LineageError(AlignError):
    """A stage's parent checkpoint is missing, unfinished or inconsistent."""
