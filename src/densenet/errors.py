"""The base of the package's error types: the command line reports a ``DenseNetError`` as one
line (it names the input and the fix), while any other exception is a bug and keeps its
traceback."""

from __future__ import annotations


class DenseNetError(Exception):
    """An error caused by the input (a file, a name, an option), with a message that says what to
    change."""


class DataError(DenseNetError, ValueError):
    """A data set that cannot be used; the message names it and says what to do."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
