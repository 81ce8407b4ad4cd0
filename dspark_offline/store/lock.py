"""One writer per part: an exclusive lock file per (store, part), held for the whole dump.

A part has a single writer by design (DESIGN.md §3), but nothing stopped a second dump started on
the same part at the same moment: both created the part and the loser died inside zarr. Now the
second one stops at once with a message naming the holder (pid, host, start time).

The lock is ``fcntl.flock`` on ``.<store name>.<part>.lock`` beside the store (not inside it:
``dump.overwrite`` deletes the store directory, lock files included). The kernel drops a flock
when its process dies, however it dies, so a lock file left by a killed dump is *stale*, not
held, and the next dump simply takes it: it can never block forever. The file is removed on
release. Stores given as fsspec URLs are not locked (no flock on object stores): run one worker
per part there. On NFS, flock is emulated with POSIX locks (Linux >= 2.6.12).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dspark_offline.store.manifest import StoreError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None


class StoreLockedError(StoreError):
    """Another live process is writing this part of the store."""


def lock_path(store: str, part: str) -> Path | None:
    """Where the lock of `part` of `store` lives; None for a store that is not a local path."""
    text = str(store)
    if "://" in text and not text.startswith("file://"):
        return None
    p = Path(text.removeprefix("file://")).absolute()
    return p.with_name(f".{p.name}.{part}.lock")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not written its details yet"


@contextmanager
def part_lock(store: str, part: str) -> Iterator[None]:
    """Hold the write lock of `part` of `store`, or raise `StoreLockedError` naming its holder."""
    path = lock_path(store, part)
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{store}: {part} is being written by another dump ({_holder(path)}; lock {path}); "
                "wait for it to finish (a re-run then resumes or finds the part complete) or stop it - "
                "a killed dump releases its lock"
            ) from None
        # The holder we waited out may have removed the file after we opened it: then our lock is
        # on a deleted file, and a third process could lock a new one. Retry on the current file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it, so no one locks a file about to vanish
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def part_locks(store: str, parts: list[str]) -> Iterator[None]:
    """Hold the locks of all `parts` (taken in order; none is kept if one is held elsewhere)."""
    with ExitStack() as stack:
        for part in parts:
            stack.enter_context(part_lock(store, part))
        yield
