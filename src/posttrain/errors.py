"""The one error type for bad user input.

Anything the user can fix (a missing file, a misspelt column, an invalid option)
raises ``UserError``; the CLI prints its message on one line and exits with code 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""

    exit_code = 2
