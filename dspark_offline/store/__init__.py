"""The Zarr v3 feature store: the contract between dump (stage 1) and train (stage 2).

Public surface only; the layout and protocol live in `manifest` (format), `plan` (where samples
go), `writer` (creation, whole-shard writes, resume), `reader` (random access), `dtypes`
(bf16 as uint16 bits) and `inspect` (summary and integrity check).
"""

from dspark_offline.store.manifest import (
    FORMAT_VERSION,
    Manifest,
    StoreError,
    StoreMismatchError,
    check_compatible,
)
from dspark_offline.store.reader import FeatureStore, StoredSample, open_store

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "Manifest",
    "StoreError",
    "StoreMismatchError",
    "StoredSample",
    "check_compatible",
    "open_store",
]
