"""The writer processes of `BackgroundWriter(workers > 1)` (store/background.py), and what they share.

Each worker is a process of its own (its own zarr event loop and GIL), started from a fork
server that imported only this module, never forked from the dump (which may hold CUDA state
and threads). Shards travel in shared-memory slots: the dump fills a slot in place, a task names
the slot, its layout and the arrays' (picklable) zarr handles, and the worker writes the whole
shard and reports back; a collector thread in the dump records it done. A worker ends at a stop
sign, or by itself once the dump is gone (SIGKILL included).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import select
import signal
import threading
import time
from multiprocessing import shared_memory
from typing import TYPE_CHECKING

import numpy as np

from dspark_offline.store.dtypes import storage_dtype
from dspark_offline.store.manifest import StoreError
from dspark_offline.store.plan import ShardPlan

if TYPE_CHECKING:
    from dspark_offline.store.background import BackgroundWriter
    from dspark_offline.store.writer import PartState

_ALIGN = 64  # byte alignment of each array inside a shared-memory slot
_POLL_S = 0.2


def wait_put(q, item, owner: BackgroundWriter, alive) -> None:
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


def storage_specs(part: PartState) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    return {name: (storage_dtype(logical), trailing) for name, (logical, trailing) in part.specs.items()}


def _layout(part: PartState, width: int) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    """[(name, dtype, shape, byte offset)] of one shard's arrays in a slot, and the bytes needed."""
    out, offset = [], 0
    for name, (dtype, trailing) in storage_specs(part).items():
        shape = (width, *trailing)
        out.append((name, dtype.str, shape, offset))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return out, offset


def _views(buf, layout) -> dict[str, np.ndarray]:
    return {name: np.ndarray(shape, np.dtype(dt), buffer=buf, offset=off) for name, dt, shape, off in layout}


class ProcessPool:
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
            ctx.Process(
                target=_worker_main,
                args=(self._tasks, self._results, os.getpid()),
                name=f"dspark-store-writer-{i}",
                daemon=True,
            )
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
                    f"dump.writer_workers={len(self._procs)}: {shm_dir} has {free / 2**20:.0f} MiB free "
                    f"but a shard needs {nbytes / 2**20:.0f} MiB there "
                    f"(up to {self._max_slots} shards at once): enlarge it (docker run --shm-size=... or "
                    "--ipc=host), lower dump.shard_tokens, or set dump.writer_workers=1 "
                    "(one writer thread, no shared memory)"
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
            wait_put(self._tasks, item, self.owner, self._alive)
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
