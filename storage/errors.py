"""The one base for errors a user sees, and the storage package's own.

Every error that a person (annotator, admin, operator at a shell) should read as one line derives
from ``UserError``: its message says what went wrong and what to do, and callers show it without
a traceback (the app and the CLIs exit with status 2; the UI shows it as a notice). Anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A one-line message for a person: what went wrong, and what to do about it."""


class StorageError(UserError):
    """The database could not be opened, migrated or written."""


class VoteRejected(StorageError):
    """A vote was refused: unknown pair token, someone else's pair, or an invalid choice."""
