"""Process setup shared by entry points (CLI, DVC stages, launchers). Never run at import time."""

from __future__ import annotations

import os


def setup_process_env() -> None:
    """Thread and library settings that must be set before torch/DeepSpeed initialise.

    On a small CPU machine two training processes (or the dump's forward + background writer)
    fight for cores; one intra-op thread per process avoids oversubscription there.
    """
    cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", "1" if cores <= 2 else str(cores))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # targets are local directories; never reach a hub
