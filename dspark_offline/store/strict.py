"""Reads under which an absent chunk or shard object is an error, never the fill value.

Zarr asks the store for an object and, when it gets nothing, fills the region with the array's
fill value: a deleted `hidden` shard reads as zeros, a deleted `sample_start` chunk as offset 0
for every sample. `StrictStore` wraps the store every reader opens (`reader.open_root`) and
raises `MissingChunkError` naming the object instead, so the rule holds on every read path
(training, verify, inspect, evaluate), whatever is deleted and whenever. It costs nothing: no
extra request, only a look at what the wrapped store returned.
"""

from __future__ import annotations

from zarr.storage import FsspecStore, LocalStore, WrapperStore

from dspark_offline.store.manifest import MissingChunkError

_METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


def repair_hint(path: str) -> str:
    return (
        f"run `dspark-offline verify {path}` for the full list, then re-run the dump (it rewrites "
        "missing or damaged shards) or re-dump with dump.overwrite=true"
    )


class StrictStore(WrapperStore):
    """A read-only store wrapper under which an absent chunk/shard object is an error.

    Zarr asks the store for an object and fills with the fill value when it gets None; here
    None is only passed through for metadata documents (``zarr.json``: "no such node").
    """

    def __init__(self, store, label: str = ""):
        super().__init__(store)
        self._label = label or str(store)

    def _with_store(self, store):
        return type(self)(store, self._label)

    def _check(self, key: str, value):
        if value is None and key.rsplit("/", 1)[-1] not in _METADATA_NAMES:
            raise MissingChunkError(
                f"{self._label}: object {key} is missing (a chunk or shard zarr would read as the fill "
                f"value); the store is damaged: {repair_hint(self._label)}"
            )
        return value

    async def get(self, key, prototype, byte_range=None):
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, v) for (key, _), v in zip(key_ranges, values)]

    async def _get_many(self, requests):
        async for key, value in self._store._get_many(requests):
            yield key, self._check(key, value)

    # Sizes from the wrapped store: zarr's default `getsize` reads the whole object through `get`.
    async def getsize(self, key: str) -> int:
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        return await self._store.getsize_prefix(prefix)


def strict_store(path: str) -> StrictStore:
    """The read-only store at `path` (local directory or fsspec URL) under `StrictStore`."""
    path = str(path)
    base = FsspecStore.from_url(path, read_only=True) if "://" in path else LocalStore(path, read_only=True)
    return StrictStore(base, path)
