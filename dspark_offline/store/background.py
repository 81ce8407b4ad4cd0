"""Background shard writers: overlap compression and storage I/O with the target forward.

The dump's main thread computes shard k+1 while earlier shards are compressed and written:

- ``workers == 1``: one thread in this process (a CPU dump: the forward already has every core);
- ``workers > 1``: that many worker *processes*. Why not threads: zarr's synchronous API runs
  every write of a process on one event-loop thread, which also does the crc32c, the buffer
  copies and the assembly of each shard, so threads of one process queue behind one serial
  stage; processes share nothing. A shard reaches a worker in shared memory: the dump fills a
  slot lent by :meth:`BackgroundWriter.buffers` in place and hands over only its name.

Memory is bounded: at most ``workers + max_pending + 1`` shards exist at once (being written,
queued, being filled); ``buffers`` and ``submit`` block until one is free.

Completion bookkeeping stays in this process and is single-writer: a worker writes a shard's
arrays; the part's ``shards_done`` is updated here when it reports success, in whatever order
shards finish (``PartState.record_done``). A shard that is not recorded is rewritten whole by
the next run. The first error is kept and re-raised at the next ``buffers``/``submit`` or at
``close``; shards queued after it are dropped, never recorded done (shards other workers were
already writing still finish and are recorded: they are whole).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import select
import signal
import threading
import time
from multiprocessing import shared_memory
from typing import Self

import numpy as np

from dspark_offline.store.manifest import StoreError
from dspark_offline.store.plan import ShardPlan
from dspark_offline.store.writer import PartState, write_arrays

log = logging.getLogger(__name__)

_ALIGN = 64  # byte alignment of each array inside a shared-memory slot
_POLL_S = 0.2


def default_workers(device_type: str, gpus: int = 1, cores: int | None = None) -> int:
    """Writer workers when `dump.writer_workers` is not set: 1 with a CPU target (the forward
    uses every core; one writer keeps up with it, README), else the cores per GPU up to 4 (about
    what one GPU's ~1.2 GB/s of features needs at the per-core rate of benchmarks/writer.py)."""
    if device_type != "cuda":
        return 1
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(4, cores // max(1, gpus)))


class BackgroundWriter:
    """Writes whole shards on `workers` threads/processes behind a bounded queue (module docstring).

    Use as a context manager. `buffers(part, shard)` lends zeroed arrays to fill (shared memory
    when workers > 1: no copy on hand-over); `submit` accepts those or any arrays of the right
    shapes (copied into a slot then).
    """

    def __init__(self, workers: int = 1, max_pending: int = 2):
        if workers < 1:
            raise ValueError(f"writer workers must be >= 1 (got {workers})")
        self.workers, self.max_pending = workers, max_pending
        self._error: BaseException | None = None
        self._where = ""
        self._lock = threading.Lock()
        self.busy_s = 0.0  # wall seconds spent writing, summed over workers
        self.cpu_s = 0.0  # CPU seconds of the writer processes (threads count in this process's own)
        self.shards_written = 0
        self._impl = _ThreadPool(self, max_pending) if workers == 1 else _ProcessPool(self, workers, max_pending)

    # -- called from the workers' side ------------------------------------------------------
    def _done(
        self, part: PartState, shard: ShardPlan, busy_s: float, error: BaseException | None, cpu_s: float = 0.0
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


def _wait_put(q, item, owner: BackgroundWriter, alive) -> None:
    """Put with a timeout loop, so a writer failure or a dead worker never blocks the caller."""
    while True:
        owner._raise_if_failed()
        if not alive():
            raise StoreError("background store writer is not running (a worker exited unexpectedly)")
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


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
        return {name: np.zeros((width, *shape), dtype) for name, (dtype, shape) in _storage_specs(part).items()}

    def submit(self, part, shard, arrays) -> None:
        _wait_put(self._queue, (part, shard, arrays), self.owner, self._thread.is_alive)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _storage_specs(part: PartState) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    from dspark_offline.store.dtypes import storage_dtype

    return {name: (storage_dtype(logical), trailing) for name, (logical, trailing) in part.specs.items()}


def _layout(part: PartState, width: int) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    """[(name, dtype, shape, byte offset)] of one shard's arrays in a slot, and the bytes needed."""
    out, offset = [], 0
    for name, (dtype, trailing) in _storage_specs(part).items():
        shape = (width, *trailing)
        out.append((name, dtype.str, shape, offset))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return out, offset


def _views(buf, layout) -> dict[str, np.ndarray]:
    return {name: np.ndarray(shape, np.dtype(dt), buffer=buf, offset=off) for name, dt, shape, off in layout}


class _ProcessPool:
    """`workers` writer processes fed through shared-memory slots; one collector thread here."""

    def __init__(self, owner: BackgroundWriter, workers: int, max_pending: int):
        self.owner = owner
        ctx = _context()
        self._tasks = ctx.Queue(maxsize=max_pending)
        self._results = ctx.Queue()
        self._max_slots = workers + max_pending + 1  # written + queued + being filled
        self._slots: list[shared_memory.SharedMemory] = []
        self._free: queue.Queue = queue.Queue()
        self._lent: dict[int, tuple[int, dict[str, np.ndarray]]] = {}  # id(arrays dict) -> slot
        self._inflight: dict[int, tuple[PartState, ShardPlan, int]] = {}
        self._next_task = 0
        self._procs = [
            ctx.Process(target=_worker_main, args=(self._tasks, self._results, os.getpid()),
                        name=f"dspark-store-writer-{i}", daemon=True)
            for i in range(workers)
        ]
        for p in self._procs:
            p.start()
        self._collector = threading.Thread(target=self._collect, name="dspark-store-collector", daemon=True)
        self._collector.start()
        self._closed = False

    def _alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def _slot(self, nbytes: int) -> int:
        """A free slot of at least `nbytes` (a new one while under the bound, else wait for one)."""
        while True:
            try:
                i = self._free.get_nowait()
            except queue.Empty:
                if len(self._slots) < self._max_slots:
                    self._slots.append(self._new_slot(nbytes))
                    return len(self._slots) - 1
                self.owner._raise_if_failed()
                if not self._alive():
                    raise StoreError("background store writer is not running (a worker exited unexpectedly)")
                try:
                    i = self._free.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
            if self._slots[i].size < nbytes:  # a wider shard than this slot was made for
                self._slots[i].close()
                self._slots[i].unlink()
                self._slots[i] = self._new_slot(nbytes)
            return i

    def _new_slot(self, nbytes: int) -> shared_memory.SharedMemory:
        """A shared-memory slot, refused up front when /dev/shm cannot hold it: writing past a full
        /dev/shm (Docker's default is 64 MiB) kills the process with SIGBUS instead of an error."""
        shm_dir = "/dev/shm"
        if os.path.isdir(shm_dir):
            st = os.statvfs(shm_dir)
            free = st.f_bavail * st.f_frsize
            if free < nbytes:
                raise StoreError(
                    f"dump.writer_workers={len(self._procs)}: {shm_dir} has {free / 2**20:.0f} MiB free but a "
                    f"shard needs {nbytes / 2**20:.0f} MiB there (up to {self._max_slots} shards at once): "
                    "enlarge it (docker run --shm-size=... or --ipc=host), lower dump.shard_tokens, or set "
                    "dump.writer_workers=1 (one writer thread, no shared memory)"
                )
        return shared_memory.SharedMemory(create=True, size=max(nbytes, 1))

    def buffers(self, part: PartState, shard: ShardPlan) -> dict[str, np.ndarray]:
        width = shard.stop - shard.start
        layout, nbytes = _layout(part, width)
        i = self._slot(nbytes)
        arrays = _views(self._slots[i].buf, layout)
        # zero what no sample covers (gaps); samples overwrite the rest
        gap = np.ones(width, dtype=bool)
        for r in range(shard.row_start, shard.row_stop):
            off = int(part.plan.sample_start[r]) - shard.start
            gap[off : off + int(part.plan.sample_length[r])] = False
        for a in arrays.values():
            a[gap] = 0
        self._lent[id(arrays)] = (i, arrays)
        return arrays

    def submit(self, part, shard, arrays) -> None:
        lent = self._lent.pop(id(arrays), None)
        layout, nbytes = _layout(part, shard.stop - shard.start)
        if lent is not None and lent[1] is arrays:
            i = lent[0]
        else:  # the caller's own arrays: one copy into a slot
            i = self._slot(nbytes)
            for name, view in _views(self._slots[i].buf, layout).items():
                view[...] = arrays[name]
        task = self._next_task
        self._next_task += 1
        self._inflight[task] = (part, shard, i)
        item = (task, self._slots[i].name, layout, part.handles, shard.start, shard.stop)
        try:
            _wait_put(self._tasks, item, self.owner, self._alive)
        except BaseException:
            self._inflight.pop(task, None)
            self._free.put(i)
            raise

    def _collect(self) -> None:
        while True:
            msg = self._results.get()
            if msg is None:
                return
            task, busy_s, cpu_s, error = msg
            part, shard, slot = self._inflight.pop(task)
            self.owner._done(part, shard, busy_s, error, cpu_s)
            self._free.put(slot)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for _ in self._procs:  # one stop sign per worker, behind the queued shards
                while any(p.is_alive() for p in self._procs):
                    try:
                        self._tasks.put(None, timeout=_POLL_S)
                        break
                    except queue.Full:
                        continue
            for p in self._procs:
                p.join()
            self._results.put(None)  # after every worker's own results (they flush on exit)
            self._collector.join()
            crashed = [p for p in self._procs if p.exitcode != 0]
            if crashed and self.owner._error is None:
                self.owner._where = "a writer process"
                self.owner._error = RuntimeError(
                    f"{crashed[0].name} exited with code {crashed[0].exitcode} "
                    f"({len(self._inflight)} shard(s) not written)"
                )
        finally:
            self._lent.clear()
            for s in self._slots:
                try:
                    s.close()
                except BufferError:  # the caller still holds a lent view (an exception's frame)
                    pass
                s.unlink()
            self._slots.clear()


# -- the worker process ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies (a spawned worker's parent is the dump)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent-pid poll below still ends it
        pass


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - an exception that cannot cross processes
        return RuntimeError(f"{type(e).__name__}: {e}")


def _context():
    """Never fork the dump itself (it may hold CUDA state and threads): workers come from a fork
    server that imported only this module (one start-up per dump, then a fork per worker), or
    are spawned where there is no fork server."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _watch(pid: int):
    """A function telling whether process `pid` has exited (a pidfd where Linux has them)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        def gone() -> bool:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True
            except PermissionError:
                return False

        return gone
    return lambda: bool(select.select([fd], [], [], 0)[0])


def _worker_main(tasks, results, dump_pid: int) -> None:
    """Write shards from `tasks` until None; report (task, wall s, CPU s, error or None).

    Ends by itself when the dump is gone (killed): a fork server's children keep the server
    alive and the queues open, so neither a parent-death signal nor an EOF would come."""
    _die_with_parent()
    dump_gone = _watch(dump_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the dump's to handle; it closes us
    attached: dict[str, shared_memory.SharedMemory] = {}
    try:
        while True:
            try:
                item = tasks.get(timeout=1.0)
            except queue.Empty:
                if dump_gone():
                    return
                continue
            if item is None:
                return
            task, slot_name, layout, handles, start, stop = item
            t0, c0, error = time.perf_counter(), time.process_time(), None
            try:
                shm = attached.get(slot_name)
                if shm is None:
                    shm = attached[slot_name] = shared_memory.SharedMemory(name=slot_name)
                for name, a in _views(shm.buf, layout).items():
                    handles[name][start:stop] = a  # a whole shard: no read-modify-write
            except BaseException as e:  # noqa: BLE001 - reported to the dump
                error = _picklable(e)
            results.put((task, time.perf_counter() - t0, time.process_time() - c0, error))
    finally:
        for shm in attached.values():
            shm.close()
