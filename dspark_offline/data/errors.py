"""Exceptions of the data stage.

Per-record problems are never raised: they are skipped and counted (see `skips.py`). These
exceptions are for problems that make a whole input or output unusable; the CLI maps any
`DataError` to a non-zero exit with its message, which always names the offending path.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class: the data stage cannot continue."""


class SourceError(DataError):
    """The conversation source cannot be read at all (missing, a directory, empty, not JSON)."""


class EmptySelectionError(DataError):
    """No sample survived validation and tokenisation; nothing useful would be written."""


class PreparedDataError(DataError):
    """A prepared-data directory is missing, partial, or does not match its own meta.json."""
