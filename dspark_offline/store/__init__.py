"""The Zarr v3 feature store: the contract between dump (stage 1) and train (stage 2).

Public surface only; the layout and protocol live in `manifest` (format), `plan` (where samples
go), `writer` (creation, whole-shard writes, resume), `reader` (random access), `dtypes`
(bf16 as uint16 bits), `fp8` (float8 hidden states with per-token per-layer scales), `inspect`
(summary, verify) and the integrity guards: `strict` (an absent chunk is an error on read),
`objects` (which objects an array has) and `integrity` (the quick check run before any data is
read); `record` is the store's completion record, its identity for DVC (written when every part
is complete, checked before the train stage uses the store).
"""

from dspark_offline.store.manifest import (
    FORMAT_VERSION,
    Manifest,
    MissingChunkError,
    StoreError,
    StoreIntegrityError,
    StoreMismatchError,
    check_compatible,
)
from dspark_offline.store.reader import FeatureStore, StoredSample, open_store

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "Manifest",
    "MissingChunkError",
    "StoreError",
    "StoreIntegrityError",
    "StoreMismatchError",
    "StoredSample",
    "check_compatible",
    "open_store",
]
