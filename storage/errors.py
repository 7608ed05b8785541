"""Exceptions raised by the storage package."""


class StorageError(Exception):
    """The database could not be opened, migrated or written."""


class VoteRejected(StorageError):
    """A vote was refused: unknown pair token, someone else's pair, or an invalid choice."""
