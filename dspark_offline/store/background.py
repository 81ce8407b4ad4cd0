"""Background shard writers: overlap compression and storage I/O with the target forward.

The dump's main thread computes shard k+1 while earlier shards are compressed and written:

- engine ``zarr`` (zarr-python, the default), ``workers == 1``: one thread in this process (a CPU
  dump: the forward already has every core);
- engine ``zarr``, ``workers > 1``: that many worker *processes*. Why not threads: zarr's synchronous API runs
  every write of a process on one event-loop thread, which also does the crc32c, the buffer
  copies and the assembly of each shard, so threads of one process queue behind one serial
  stage; processes share nothing. A shard reaches a worker in shared memory: the dump fills a
  slot lent by :meth:`BackgroundWriter.buffers` in place and hands over only its name
  (`store/shard_processes.py`).
- engine ``tensorstore`` (`dump.writer_engine`, optional extra): tensorstore's C++ thread pools
  (encoding and file I/O limited to ``workers`` threads), driven from one thread of this process;
  a shard is committed as soon as it is submitted (`store/tensorstore_engine.py`). Same bytes,
  same protocol, same memory bound.

Memory is bounded: at most ``workers + max_pending + 1`` shards exist at once (being written,
queued, being filled); ``buffers`` and ``submit`` block until one is free.

Completion bookkeeping stays in this process and is single-writer: a worker writes a shard's
arrays; the part's ``shards_done`` is updated here when it reports success, in whatever order
shards finish (``PartState.record_done``). A shard that is not recorded is rewritten whole by
the next run. The first error is kept and re-raised at the next ``buffers``/``submit`` or at
``close``; from then on no shard is recorded done (the writer thread drops queued shards; writer
processes and tensorstore commits under way may still write theirs, which the next run rewrites
whole).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Literal, Self

import numpy as np

from dspark_offline.store.manifest import StoreError
from dspark_offline.store.plan import ShardPlan
from dspark_offline.store.shard_processes import ProcessPool, storage_specs, wait_put
from dspark_offline.store.writer import PartState, write_arrays

log = logging.getLogger(__name__)


def default_workers(device_type: str, gpus: int = 1, cores: int | None = None) -> int:
    """Writer workers when `dump.writer_workers` is not set: 1 with a CPU target (the forward
    uses every core and one writer keeps up with it), else the cores per GPU up to 4 (about
    what one GPU's ~1.2 GB/s of features needs at the per-core rate of benchmarks/writer.py)."""
    if device_type != "cuda":
        return 1
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(4, cores // max(1, gpus)))


class BackgroundWriter:
    """Writes whole shards with `engine` on `workers` threads/processes behind a bounded queue
    (module docstring).

    Use as a context manager. `buffers(part, shard)` lends zeroed arrays to fill (shared memory
    when workers > 1: no copy on hand-over); `submit` accepts those or any arrays of the right
    shapes (copied into a slot then).
    """

    def __init__(
        self, workers: int = 1, max_pending: int = 2, engine: Literal["zarr", "tensorstore"] = "zarr"
    ):
        if workers < 1:
            raise ValueError(f"writer workers must be >= 1 (got {workers})")
        if engine not in ("zarr", "tensorstore"):
            raise ValueError(f"writer engine must be 'zarr' or 'tensorstore' (got {engine!r})")
        self.workers, self.max_pending = workers, max_pending
        self._error: BaseException | None = None
        self._where = ""
        self._lock = threading.Lock()
        self.busy_s = 0.0  # wall seconds spent writing, summed over workers
        self.cpu_s = 0.0  # CPU seconds of writer processes (threads, tensorstore's too, count in ours)
        self.shards_written = 0
        if engine == "tensorstore":
            from dspark_offline.store.tensorstore_engine import TensorstorePool  # optional extra

            self._impl = TensorstorePool(self, workers, max_pending)
        elif workers == 1:
            self._impl = _ThreadPool(self, max_pending)
        else:
            self._impl = ProcessPool(self, workers, max_pending)

    # -- called from the workers' side ------------------------------------------------------
    def _done(
        self,
        part: PartState,
        shard: ShardPlan,
        busy_s: float,
        error: BaseException | None,
        cpu_s: float = 0.0,
    ) -> None:
        with self._lock:
            self.busy_s += busy_s
            self.cpu_s += cpu_s
            if error is None and self._error is None:
                try:
                    part.record_done(shard.index)
                    self.shards_written += 1
                    return
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    error = e
            if error is not None and self._error is None:
                self._where, self._error = f"{part.name} shard {shard.index}", error

    @property
    def failed(self) -> bool:
        return self._error is not None

    # -- the caller's side ---------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"background store writer failed on {self._where}: {self._error}"
            ) from self._error

    def buffers(self, part: PartState, shard: ShardPlan) -> dict[str, np.ndarray]:
        """Zeroed arrays (storage dtypes, token axis = shard width) to fill and pass to `submit`."""
        self._raise_if_failed()
        return self._impl.buffers(part, shard)

    def submit(self, part: PartState, shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        """Queue one whole shard of `part` (arrays in storage dtypes, token axis = shard width)."""
        self._raise_if_failed()
        try:
            part.check_shard(shard, arrays)
        except ValueError as e:  # reported like any writer failure: the shard is never recorded
            with self._lock:
                self._where, self._error = f"{part.name} shard {shard.index}", e
            self._raise_if_failed()
        self._impl.submit(part, shard, arrays)

    def close(self) -> None:
        """Wait for queued shards to be written; raise the writers' error if any."""
        self._impl.close()
        self._raise_if_failed()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: stop the workers, keep the original exception
            self.close()
        except StoreError as e:
            log.error("%s", e)


class _ThreadPool:
    """One writer thread in this process."""

    def __init__(self, owner: BackgroundWriter, max_pending: int):
        self.owner = owner
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="dspark-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.owner.failed:
                continue  # drop: nothing after a failure may be recorded done
            part, shard, arrays = item
            t0, error = time.perf_counter(), None
            try:
                write_arrays(part.handles, shard, arrays)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                error = e
            self.owner._done(part, shard, time.perf_counter() - t0, error)

    def buffers(self, part: PartState, shard: ShardPlan) -> dict[str, np.ndarray]:
        width = shard.stop - shard.start
        return {
            name: np.zeros((width, *shape), dtype) for name, (dtype, shape) in storage_specs(part).items()
        }

    def submit(self, part, shard, arrays) -> None:
        wait_put(self._queue, (part, shard, arrays), self.owner, self._thread.is_alive)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
