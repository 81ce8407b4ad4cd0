"""Process setup shared by entry points (CLI, DVC stages, launchers). Never run at import time."""

from __future__ import annotations

import os


def setup_process_env() -> None:
    """Library settings that must be set before torch/DeepSpeed initialise.

    Threads are left to torch (one process uses every core); launchers of several processes on
    one CPU set OMP_NUM_THREADS themselves (torchrun sets 1), and an explicit value is respected.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # targets are local directories; never reach a hub
