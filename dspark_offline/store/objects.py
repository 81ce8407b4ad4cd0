"""Which objects (chunks, or shards of a sharded array) an array has, and whether they are whole.

An object is named by its grid coordinates and its store key (`object_key`). `damaged_objects`
lists the objects that are missing (one listing per array) and, for sharded arrays, reads each
shard's index (16 bytes per inner chunk + a crc32c, at the end of the object): a truncated or
corrupt shard fails the crc32c, and an inner chunk the index marks absent would read as the
fill value. No chunk data is decoded.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Iterable

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import ShardingCodec, ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from dspark_offline.store.manifest import MissingChunkError

_EMPTY = np.uint64(2**64 - 1)  # shard index entry of an absent inner chunk (zarr v3 sharding spec)


def grid_shape(arr: zarr.Array) -> tuple[int, ...]:
    """Objects per dimension: the shard grid of a sharded array, else the chunk grid."""
    outer = arr.metadata.chunk_grid.chunk_shape
    return tuple(math.ceil(s / c) for s, c in zip(arr.shape, outer))


def object_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Store key of the object (chunk, or shard of a sharded array) at grid `coords`."""
    key = arr.metadata.encode_chunk_key(tuple(coords))
    base = arr.store_path.path
    return f"{base}/{key}" if base else key


def object_region(arr: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    outer = arr.metadata.chunk_grid.chunk_shape
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, outer, arr.shape))


def all_coords(arr: zarr.Array) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(n) for n in grid_shape(arr))))


def token_shards(arr: zarr.Array, shards: Iterable[int]) -> list[tuple[int, ...]]:
    """Grid coords of the given shards of a token-axis array ([T, ...], one shard across the rest)."""
    return [(int(s),) + (0,) * (arr.ndim - 1) for s in shards]


def _present(arr: zarr.Array) -> set[str]:
    store, base = arr.store_path.store, arr.store_path.path

    async def listing():
        return {k async for k in store.list_prefix(f"{base}/" if base else "")}

    return sync(listing())


def _inner_grid(arr: zarr.Array) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(inner chunk shape, chunks per shard) when the array's shard index is the layout checked
    here (index at the end: little-endian uint64 (offset, nbytes) pairs + crc32c); else None."""
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sc = codecs[0]
    names = [type(c).__name__ for c in sc.index_codecs]
    if sc.index_location != ShardingCodecIndexLocation.end or names != ["BytesCodec", "Crc32cCodec"]:
        return None
    outer = arr.metadata.chunk_grid.chunk_shape
    return tuple(sc.chunk_shape), tuple(o // i for o, i in zip(outer, sc.chunk_shape))


def _absent_chunks(data: bytes | None, n: int) -> tuple[str | None, np.ndarray]:
    """(problem with the shard index itself, indices of the inner chunks it marks absent)."""
    size = 16 * n + 4
    if data is None:
        return "missing", np.zeros(0, np.int64)
    if len(data) < size:
        return f"truncated ({len(data)} bytes, shorter than its {size}-byte shard index)", np.zeros(
            0, np.int64
        )
    body, crc = data[-size:-4], int.from_bytes(data[-4:], "little")
    if google_crc32c.value(body) != crc:
        return "shard index fails its crc32c (truncated or corrupt shard)", np.zeros(0, np.int64)
    entries = np.frombuffer(body, dtype="<u8").reshape(n, 2)
    return None, np.flatnonzero((entries == _EMPTY).all(axis=1))


def read_suffixes(arr: zarr.Array, coords: list[tuple[int, ...]], nbytes: int) -> list[bytes | None]:
    """The last `nbytes` bytes of each object at `coords` (None for an absent object), read
    concurrently: a shard's index, or the crc32c that ends every chunk of our codec chain."""
    store = arr.store_path.store

    async def read_all():
        async def one(c):
            try:
                buf = await store.get(
                    object_key(arr, c), default_buffer_prototype(), SuffixByteRequest(nbytes)
                )
            except MissingChunkError:
                return None
            return None if buf is None else buf.to_bytes()

        return await asyncio.gather(*(one(c) for c in coords))

    return sync(read_all()) if coords else []


def shard_index_bytes(arr: zarr.Array) -> int | None:
    """Size of the index at the end of each shard of `arr`; None when it is not sharded (or its
    index is not the layout read here)."""
    grid = _inner_grid(arr)
    return None if grid is None else 16 * math.prod(grid[1]) + 4


def damaged_objects(
    arr: zarr.Array, coords: list[tuple[int, ...]], needed: Callable[[int, int], bool] | None = None
) -> dict[tuple[int, ...], str]:
    """{coords: reason} for the objects of `arr` at `coords` that are missing or, for a sharded
    array, whose shard index is truncated or corrupt or marks a needed inner chunk absent. Decodes
    no data. `needed(lo, hi)`: whether an inner chunk over rows [lo, hi) of the first axis must
    exist (default: every one must)."""
    if not coords:
        return {}
    present = _present(arr)
    bad = {c: "missing" for c in coords if object_key(arr, c) not in present}
    grid = _inner_grid(arr)
    check = [c for c in coords if c not in bad]
    if grid is None or not check:
        return bad
    inner, per_shard = grid
    n, outer = math.prod(per_shard), arr.metadata.chunk_grid.chunk_shape
    for c, data in zip(check, read_suffixes(arr, check, 16 * n + 4)):
        why, absent = _absent_chunks(data, n)
        # an inner chunk wholly past the end of the array (in the last shard) is never written
        starts = [
            c[d] * outer[d] + np.asarray(i) * inner[d]
            for d, i in enumerate(np.unravel_index(absent, per_shard))
        ]
        inside = np.all([st < size for st, size in zip(starts, arr.shape)], axis=0) if len(absent) else []
        absent = [int(k) for k, ok in zip(absent, inside) if ok]
        if needed is not None and absent:
            first = c[0] * outer[0] + np.unravel_index(absent, per_shard)[0] * inner[0]  # first row of each
            absent = [k for k, lo in zip(absent, first) if needed(int(lo), int(lo) + inner[0])]
        if why is None and absent:
            why = f"{len(absent)} of {n} inner chunks absent from the shard index (chunk(s) {absent[:5]})"
        if why:
            bad[c] = why
    return bad
