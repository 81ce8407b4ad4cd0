"""The background shard writer: overlaps compression and storage I/O with the target forward.

One thread, one bounded queue: the dump's main thread computes shard k+1 while shard k is being
compressed and written, and blocks once `max_pending` shards wait, which bounds memory to a few
shards. An error in the thread is kept and re-raised in the main thread at its next `submit` or
at `close`; shards queued after a failure are dropped, never recorded done.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Self

import numpy as np

from dspark_offline.store.manifest import StoreError
from dspark_offline.store.plan import ShardPlan
from dspark_offline.store.writer import PartState

log = logging.getLogger(__name__)


class BackgroundWriter:
    """Writes whole shards on one thread behind a bounded queue; re-raises its errors here.

    Use as a context manager; `submit` blocks when `max_pending` shards are queued, which
    bounds memory to a few shards.
    """

    def __init__(self, max_pending: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._where = ""
        self.busy_s = 0.0
        self.shards_written = 0
        self._thread = threading.Thread(target=self._run, name="dspark-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drop: nothing after a failure may be recorded done
            part, shard, arrays = item
            t0 = time.perf_counter()
            try:
                part.write_shard(shard, arrays)
                self.shards_written += 1
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._where = f"{part.name} shard {shard.index}"
                self._error = e
            self.busy_s += time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"background store writer failed on {self._where}: {self._error}"
            ) from self._error

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise StoreError("background store writer thread is not running")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def submit(self, part: PartState, shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        """Queue one whole shard of `part` (arrays in storage dtypes, token axis = shard width)."""
        self._put((part, shard, arrays))

    def close(self) -> None:
        """Wait for queued shards to be written; raise the writer's error if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: stop the thread, keep the original exception
            self.close()
        except StoreError as e:
            log.error("%s", e)
