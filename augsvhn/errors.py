"""Exceptions for mistakes a user can fix: bad input files, bad settings, folders in use."""


class AugsvhnError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 1."""


class DataError(AugsvhnError, ValueError):
    """An input file (SVHN .mat, shard, manifest, clusters file) is missing, unreadable or malformed."""
