"""The one exception type for user mistakes (bad input, impossible settings).

The CLI prints it as one line on stderr and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class EdgesparseError(Exception):
    """A problem with what the user asked for, with an optional hint on how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def first_line(exc: BaseException) -> str:
    """The first non-blank line of a library's (often multi-page) error, for a one-line message."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
