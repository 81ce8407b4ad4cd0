"""Output paths checked before any work: a stage that cannot write its outputs says so at once.

Without these checks a read-only directory, or a file where a directory should be, surfaced as
an OSError traceback from deep inside zarr, torch or DeepSpeed, and `evaluate` only failed after
decoding every prompt. Each stage calls `check_output_dir` / `check_output_file` for everything
it will write, first thing. Writability is *probed* (a temporary file is created and removed)
rather than inferred from permission bits, which root, ACLs and read-only mounts make unreliable.
fsspec URLs (``s3://...``) are not checked: their backends report their own errors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_PROBE_PREFIX = ".dspark-offline-write-test-"


class OutputPathError(RuntimeError):
    """An output path that cannot be written; the message names the parameter, the path and the fix."""


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL other than ``file://`` (not checked here)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _local(path: str | Path) -> Path:
    text = str(path)
    return Path(text.removeprefix("file://"))


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _probe(directory: Path, what: str, path: str | Path) -> None:
    """Create and remove a temporary file in `directory`; raise `OutputPathError` if that fails."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=_PROBE_PREFIX)
    except OSError as e:
        raise OutputPathError(
            f"{what}={str(path)!r}: cannot write in {directory} ({e.strerror or e}); "
            "make it writable or choose another path"
        ) from e
    os.close(fd)
    os.unlink(name)


def _check_parents(p: Path, what: str, path: str | Path) -> Path:
    """The nearest existing ancestor of `p`, which must be a directory; returns it."""
    base = _nearest_existing(p)
    if not base.is_dir():
        raise OutputPathError(
            f"{what}={str(path)!r}: {base} is a file, so no directory can be created under it; "
            "choose another path"
        )
    return base


def check_output_dir(path: str | Path, what: str, *, replaced_whole: bool = False) -> None:
    """Refuse an output directory that cannot be written: a file in its place or among its
    parents, or no write permission (read-only mount, permissions, ...).

    `what` is the parameter that names it (e.g. ``"dump.store"``). With `replaced_whole` the
    directory is written beside itself and renamed into place, so its parent must be writable.
    """
    if is_url(path):
        return
    p = _local(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(
            f"{what}={str(path)!r} is an existing file, not a directory; remove it or choose another path"
        )
    if replaced_whole:
        _probe(_check_parents(p.absolute().parent, what, path), what, path)
    else:
        _probe(_check_parents(p, what, path), what, path)


def check_output_file(path: str | Path, what: str) -> None:
    """Refuse an output file that cannot be written: a directory in its place, a file among its
    parents, a read-only file, or a directory where it cannot be created."""
    if is_url(path):
        return
    p = _local(path)
    if p.is_dir():
        raise OutputPathError(f"{what}={str(path)!r} is a directory; give the path of a file")
    if p.exists():
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))  # opens for writing, changes nothing
        except OSError as e:
            raise OutputPathError(
                f"{what}={str(path)!r}: cannot write it ({e.strerror or e}); "
                "make it writable or choose another path"
            ) from e
        return
    _probe(_check_parents(p.parent, what, path), what, path)
