"""Conversations -> chat-template tokens + loss mask, and the prepared-data format.

The pieces the `prepare` stage (`dspark_offline/prepare.py`) is built from: sources, rendering
with the chat template, skip accounting, and the prepared-data writer/reader. `PreparedSplit.load(dir,
split)` reads the data. Only numpy is imported here; transformers loads when a tokenizer is needed.
"""

from dspark_offline.data.errors import DataError, EmptySelectionError, PreparedDataError, SourceError
from dspark_offline.data.prepared import PreparedSplit

__all__ = ["DataError", "EmptySelectionError", "PreparedDataError", "PreparedSplit", "SourceError"]
