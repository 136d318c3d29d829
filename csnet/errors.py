"""One error type for everything a user can get wrong.

The CLI turns a ``CsnetError`` into a single ``error: ...`` line and its exit
code; library code raises it instead of printing or exiting.
"""


class CsnetError(Exception):
    """A problem the user can fix: bad data, a bad option, a folder that is not a run."""

    exit_code = 1
    label = "error"  # the word before the one-line message


class UsageError(CsnetError):
    """An option value or combination of options that cannot work (exit 2, like a shell usage error)."""

    exit_code = 2
