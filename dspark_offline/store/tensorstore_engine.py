"""tensorstore as the shard-writer engine of the dump (`dump.writer_engine: tensorstore`).

tensorstore (the optional `tensorstore` extra) writes the Zarr v3 sharded format from its own C++
thread pools, so compression, checksums and I/O neither queue behind zarr-python's one event-loop
thread nor need writer processes: one Python thread of the dump drives them (`TensorstorePool`,
used by `store/background.py`'s `BackgroundWriter`).

The arrays are still created by zarr-python (`store/writer.py`); tensorstore only opens them
(`open=True`) with the layout our store gives them, built here from the manifest (`array_metadata`:
shape, shard and inner chunk shape, storage dtype, fill value 0, the codec chain, the
`logical_dtype` attribute). tensorstore checks that against each array's own zarr.json and refuses
to open an array that differs, so it can only write the layout the manifest describes. Every chunk
is stored even when it equals the fill value (ours: `write_empty_chunks`), so the shard objects
are byte-identical to zarr-python's (tests/test_dump_writers.py).

Durability matches zarr-python's LocalStore: each object is written to a temporary file and
renamed into place (a kill leaves the old object or the new one, never half of one), with no
fsync (tensorstore's `file_io_sync` is turned off; zarr-python does not fsync either). A shard is
recorded done only after tensorstore's commit of all its arrays returned.
"""

from __future__ import annotations

import collections
import importlib.util
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from dspark_offline.errors import UserError
from dspark_offline.store.dtypes import LOGICAL_DTYPE_ATTR, storage_dtype
from dspark_offline.store.manifest import StoreError

if TYPE_CHECKING:
    from dspark_offline.store.background import BackgroundWriter
    from dspark_offline.store.plan import ShardPlan
    from dspark_offline.store.writer import PartState

_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_POLL_S = 0.2
INSTALL = "pip install 'dspark-offline[tensorstore]' (from a checkout: pip install -e '.[tensorstore]')"


class WriterEngineError(UserError):
    """`dump.writer_engine: tensorstore` cannot be used here (not installed, or not a local store)."""


class TensorstoreWriteError(OSError):
    """tensorstore failed to commit a shard's writes (its errors are I/O errors of the storage)."""


def available() -> bool:
    return importlib.util.find_spec("tensorstore") is not None


def require_installed() -> None:
    if not available():
        raise WriterEngineError(
            f"dump.writer_engine=tensorstore: the tensorstore package is not installed; {INSTALL}, "
            "or set dump.writer_engine=zarr"
        )


def require(store: str) -> None:
    """Refuse `dump.writer_engine=tensorstore` up front (before the target loads) where it cannot
    run: tensorstore not installed, or a store that is not a local directory."""
    require_installed()
    if "://" in store and not store.startswith("file://"):
        raise WriterEngineError(
            f"dump.writer_engine=tensorstore writes local directories only, but dump.store={store!r} is "
            "a URL; set dump.writer_engine=zarr (fsspec URLs) or dump to a local path"
        )


def compressor_codecs(compressor: str, level: int, dtype: np.dtype) -> list[dict]:
    """The store's codec chain after `bytes` (store/writer.py `compressors`), as Zarr v3 JSON."""
    crc = {"name": "crc32c"}
    if compressor == "zstd":
        return [{"name": "zstd", "configuration": {"level": level, "checksum": False}}, crc]
    if compressor == "blosc":
        blosc = {"cname": "zstd", "clevel": min(level, 9), "shuffle": "shuffle", "blocksize": 0}
        return [{"name": "blosc", "configuration": {**blosc, "typesize": dtype.itemsize}}, crc]
    if compressor == "none":
        return [crc]
    raise ValueError(f"compressor={compressor!r}: expected zstd, blosc or none")


def array_metadata(manifest, logical: str, trailing: tuple[int, ...], num_positions: int) -> dict:
    """zarr.json metadata of one per-token array of a part, as our store lays it out."""
    dtype = storage_dtype(logical)
    shard, chunk = manifest.shard_tokens, manifest.chunk_tokens
    inner = [_BYTES, *compressor_codecs(manifest.compressor, manifest.compression_level, dtype)]
    sharding = {
        "chunk_shape": [chunk, *trailing],
        "codecs": inner,
        "index_codecs": [_BYTES, {"name": "crc32c"}],
        "index_location": "end",
    }
    return {
        "shape": [num_positions, *trailing],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard, *trailing]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": sharding}],
        "attributes": {LOGICAL_DTYPE_ATTR: logical},
    }


def context(workers: int):
    """tensorstore's thread pools limited to `workers` (encoding and file I/O), no fsync (see top)."""
    import tensorstore as ts

    return ts.Context(
        {
            "data_copy_concurrency": {"limit": workers},
            "file_io_concurrency": {"limit": workers},
            "file_io_sync": False,
        }
    )


def array_spec(directory: str, metadata: dict) -> dict:
    """The zarr3 spec of the array in local `directory` with `metadata` (a constraint when opening
    an existing array: tensorstore refuses one whose zarr.json differs)."""
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": directory.rstrip("/") + "/"},
        "metadata": metadata,
        "store_data_equal_to_fill_value": True,  # ours: write_empty_chunks
    }


def _local_dir(arr) -> str:
    """Directory of a zarr array in a local store (a path, or a file:// URL); refused for any other."""
    from zarr.storage import LocalStore

    store, path = arr.store_path.store, arr.store_path.path
    if isinstance(store, LocalStore):
        return str(store.root / path)
    fs = getattr(store, "fs", None)
    if "file" in getattr(fs, "protocol", ()):  # fsspec's local filesystem (a file:// store)
        return f"{store.path.rstrip('/')}/{path}"
    raise WriterEngineError(
        f"dump.writer_engine=tensorstore writes local directories only, not a {type(store).__name__} "
        f"({path}); set dump.writer_engine=zarr"
    )


class TensorstorePool:
    """Whole shards committed by tensorstore; one driver thread here. At most `workers + max_pending`
    shards are handed over and not yet finished (`workers + max_pending + 1` with the one being
    filled, as the zarr engine); each is committed as soon as the driver takes it, so tensorstore
    always has the next shards to encode while its `workers` threads are busy (with only `workers`
    commits in flight its threads idle while this thread records a shard and starts the next).
    Shards are recorded done as their commits return, in any order."""

    def __init__(self, owner: BackgroundWriter, workers: int, max_pending: int):
        require_installed()
        self.owner, self.workers, self.max_pending = owner, workers, max_pending
        self._ctx = context(workers)
        self._opened: dict[str, dict] = {}  # part name -> array name -> tensorstore handle
        self._cv = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (part, shard, arrays) not yet committing
        self._held = 0  # shards handed over by `submit` and not yet recorded or dropped
        self._finished: collections.deque = collections.deque()  # (task, error) from commit callbacks
        self._inflight: dict[int, tuple[PartState, ShardPlan, float]] = {}  # driver thread only
        self._next_task = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dspark-store-tensorstore", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------------
    def _open(self, part: PartState) -> dict:
        """The part's feature arrays, opened once (on the caller's thread: a layout that differs
        from the manifest's fails before any shard is computed)."""
        handles = self._opened.get(part.name)
        if handles is None:
            import tensorstore as ts

            handles = {}
            for name, (logical, trailing) in part.specs.items():
                directory = _local_dir(part.handles[name])
                meta = array_metadata(part.manifest, logical, trailing, part.plan.num_positions)
                try:
                    handles[name] = ts.open(
                        array_spec(directory, meta), open=True, context=self._ctx
                    ).result()
                except ValueError as e:
                    raise StoreError(
                        f"{part.name}/{name}: tensorstore cannot open it as the manifest's layout: {e}"
                    ) from e
            self._opened[part.name] = handles
        return handles

    def buffers(self, part: PartState, shard: ShardPlan) -> dict[str, np.ndarray]:
        self._open(part)
        width = shard.stop - shard.start
        return {
            name: np.zeros((width, *trailing), storage_dtype(logical))
            for name, (logical, trailing) in part.specs.items()
        }

    def submit(self, part: PartState, shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        self._open(part)
        with self._cv:
            while self._held >= self.workers + self.max_pending:
                self.owner._raise_if_failed()
                if not self._thread.is_alive():
                    raise StoreError("background store writer is not running (its thread exited)")
                self._cv.wait(_POLL_S)
            self._queue.append((part, shard, arrays))
            self._held += 1
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()

    # -- the driver thread -------------------------------------------------------------------------
    def _next_event(self):
        """Block until a commit finished (("done", [...])), a shard may start (("start", item)), or
        everything is written after close (None)."""
        with self._cv:
            while True:
                if self._finished:
                    done = list(self._finished)
                    self._finished.clear()
                    return "done", done
                if self._queue:
                    return "start", self._queue.popleft()
                if self._closing and not self._queue and not self._inflight:
                    return None
                self._cv.wait()

    def _run(self) -> None:
        while (event := self._next_event()) is not None:
            kind, what = event
            if kind == "done":
                for task, error in what:
                    part, shard, t0 = self._inflight.pop(task)
                    self.owner._done(part, shard, time.perf_counter() - t0, error)
                self._release(len(what))
            elif not self.owner.failed:  # else drop: nothing after a failure may be recorded done
                self._start(*what)
            else:
                self._release(1)

    def _release(self, n: int) -> None:
        with self._cv:
            self._held -= n
            self._cv.notify_all()  # room for the next shard

    def _start(self, part: PartState, shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        """Stage every array's whole-shard write in one transaction and commit it asynchronously."""
        import tensorstore as ts

        t0 = time.perf_counter()
        try:
            txn = ts.Transaction()
            handles = self._opened[part.name]
            staged = [
                handles[name]
                .with_transaction(txn)[shard.start : shard.stop]
                .write(
                    a,
                    can_reference_source_data_indefinitely=True,  # the caller hands the buffers over
                )
                for name, a in arrays.items()
            ]
            for f in staged:
                f.result()  # staged in the transaction, no I/O yet
            commit = txn.commit_async()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.owner._done(part, shard, time.perf_counter() - t0, e)
            self._release(1)
            return
        task = self._next_task
        self._next_task += 1
        self._inflight[task] = (part, shard, t0)
        commit.add_done_callback(lambda f, task=task: self._committed(task, f))

    def _committed(self, task: int, future) -> None:
        """Runs on a tensorstore thread (or at once, if the commit already finished)."""
        try:
            future.result()
            error = None
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            error = TensorstoreWriteError(f"tensorstore commit failed: {e}")
        with self._cv:
            self._finished.append((task, error))
            self._cv.notify_all()
