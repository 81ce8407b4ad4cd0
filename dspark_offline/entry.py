"""Process setup and error reporting shared by entry points (CLI, DVC stages, launchers).
Never run at import time."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "DSPARK_OFFLINE_DEBUG"

# Filesystem conditions of the environment, not bugs: one line naming the path, and what to do.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: (
        "the disk is full: free space and re-run (a dump, generate or train run resumes where it stopped)"
    ),
    errno.EDQUOT: "the disk quota is exceeded: free space and re-run (a dump, generate or train run resumes)",
    errno.EROFS: "read-only file system: choose a writable path",
    errno.EACCES: "permission denied: make it writable or choose another path",
    errno.EPERM: "operation not permitted: check the path's permissions",
    errno.ENOTDIR: "a path component is a file, not a directory: choose another path",
    errno.EISDIR: "a directory is in the place of a file: choose another path",
    errno.EEXIST: "something already exists there: remove it or choose another path",
    errno.ENAMETOOLONG: "the path is too long",
}


def setup_process_env() -> None:
    """Library settings that must be set before torch/DeepSpeed initialise.

    Threads are left to torch (one process uses every core); launchers of several processes on
    one CPU set OMP_NUM_THREADS themselves (torchrun sets 1), and an explicit value is respected.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # targets are local directories; never reach a hub


def describe_user_error(e: BaseException) -> str | None:
    """The one-line report of a user or environment error, or None for anything else (a bug,
    which keeps its traceback).

    User errors are our own exception types (they name the file, field or store and the fix),
    invalid parameters, a missing file or optional package, and filesystem conditions such as a
    full disk or a read-only directory.
    """
    from pydantic import ValidationError

    if isinstance(e, ValidationError) and e.title == "Params":
        from dspark_offline.config import describe_validation_error

        return f"invalid parameters: {describe_validation_error(e)}"
    from dspark_offline.errors import UserError

    if isinstance(e, UserError):
        return str(e)
    if type(e).__module__.startswith("dspark_offline") or isinstance(e, (FileNotFoundError, ImportError)):
        return f"{type(e).__name__}: {e}"
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        where = f" {e.filename!r}" if e.filename else ""
        return f"{type(e).__name__}:{where} {e.strerror or e}; {_ENVIRONMENT_ERRNOS[e.errno]}"
    return None


def report_errors(fn: Callable[[], Any]) -> Any:
    """Call `fn()`; a user or environment error (`describe_user_error`) becomes one line on
    stderr and exit code 2, anything else propagates with its traceback. Set
    DSPARK_OFFLINE_DEBUG=1 to see the traceback of every error."""
    try:
        return fn()
    except Exception as e:
        line = None if os.environ.get(DEBUG_ENV) else describe_user_error(e)
        if line is None:
            raise
        _close_progress_bars()
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def _close_progress_bars() -> None:
    """Close the progress bars the failed stage left open, so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def stage_main(body: Callable[[Any], Any], params_file: str = "params.yaml") -> None:
    """Entry point of a DVC stage script: set up the process, load `params_file` and call
    `body(params)`, reporting user errors (a typo in params.yaml included) as one line, exit 2."""
    from pydantic import ValidationError

    from dspark_offline.config import ParamsError, describe_validation_error, load_params

    setup_process_env()

    def main() -> None:
        try:
            params = load_params(params_file)
        except ValidationError as e:
            raise ParamsError(f"invalid parameters ({params_file}): {describe_validation_error(e)}") from None
        body(params)

    report_errors(main)
