"""Conversations -> chat-template tokens + loss mask (`prepare`), and the prepared-data reader.

Public surface: `prepare.run(params)` writes the data, `PreparedSplit.load(dir, split)` reads
it. Only numpy is imported here; transformers loads when a tokenizer is needed.
"""

from dspark_offline.data.errors import DataError, EmptySelectionError, PreparedDataError, SourceError
from dspark_offline.data.prepared import PreparedSplit

__all__ = ["DataError", "EmptySelectionError", "PreparedDataError", "PreparedSplit", "SourceError"]
