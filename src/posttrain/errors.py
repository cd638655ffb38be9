"""The one error type for bad user input.

Anything the user can fix (a missing file, a misspelt column, an invalid option)
raises ``UserError``; the CLI prints its message on one line and exits with code 2.
Everything else is a bug and keeps its traceback.

``UserCodeError`` is the user's own code failing (a reward function that raises): still
the user's to fix, so still one line, but followed by the traceback through their code.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""

    exit_code = 2


# Frames of these packages sit between the CLI and the user's code: noise in the user's traceback.
HIDDEN_PACKAGES = (Path(__file__).parent, Path(importlib.__file__).parent)


def hidden(filename: str) -> bool:
    """Whether a traceback frame belongs to posttrain or to the import machinery rather than to the user."""
    if filename.startswith("<frozen importlib"):
        return True
    return any(Path(filename).is_relative_to(package) for package in HIDDEN_PACKAGES)


class UserCodeError(UserError):
    """The user's code raised ``error``: one line, then the traceback of the user's frames only."""

    def __init__(self, message: str, error: Exception) -> None:
        super().__init__(message)
        self.error = error

    def user_traceback(self) -> str:
        """``error``'s traceback (and of the exceptions chained to it) without posttrain's and importlib's frames."""
        report = traceback.TracebackException.from_exception(self.error)
        pending = [report]
        while pending:
            item = pending.pop()
            item.stack = traceback.StackSummary.from_list([f for f in item.stack if not hidden(f.filename)])
            pending += [chained for chained in (item.__cause__, item.__context__) if chained is not None]
        return "".join(report.format())
