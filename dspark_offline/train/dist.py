"""Process-group and launcher environment handling for stage 2.

Three ways to start training, one code path:

* plain process (``dspark-offline train``): no launcher variables are set, so we make a
  world of one ourselves (an in-memory rendezvous store, no port);
* ``torchrun --nproc_per_node=N -m dspark_offline.cli train ...`` (multi-node:
  ``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``);
* ``deepspeed --num_gpus=N [--hostfile hosts] --no_local_rank --module dspark_offline.cli train ...``
  (multi-node by hostfile; each host runs N ranks).

Both launchers export ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; we read them, bind the local GPU, and initialise ``torch.distributed``
*before* DeepSpeed does (nccl on CUDA, gloo on CPU). DeepSpeed then wraps the existing group.

On CPU DeepSpeed's accelerator would JIT-compile a shared-memory all-reduce op on every
``TorchBackend`` construction (30-45 s, and a C++ toolchain). ``deepspeed.comm.torch.build_shm_op``
only builds it when ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` is true; that
dict is a lazily probed module attribute whose edits persist, so :func:`setup` marks the op
incompatible and collectives go through plain gloo.

Everything here mutates process state, so it is only ever called from an entry point
(``loop.run`` / ``export.run``), never at import time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what env:// rendezvous reads


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the data-parallel world."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LauncherEnvError(RuntimeError):
    """The launcher environment is inconsistent (e.g. RANK set without WORLD_SIZE)."""


def _read_launcher_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) set by a launcher, or None when there is no launcher."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    missing = [v for v in _LAUNCHER_VARS if v not in os.environ]
    if missing:
        present = [v for v in _LAUNCHER_VARS if v in os.environ]
        raise LauncherEnvError(
            f"launcher environment is partial: {', '.join(present)} set but {', '.join(missing)} missing; "
            "start with torchrun / deepspeed, or unset RANK and WORLD_SIZE for a single process"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise LauncherEnvError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers: {e}") from e
    if not 0 <= rank < world:
        raise LauncherEnvError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, local_rank, world


def _disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory comm op (see module docstring)."""
    import deepspeed.ops

    # Seeding the cache also skips DeepSpeed's probe of every op (compiler subprocesses that print
    # linker errors for libaio & co.); on CPU only build_shm_op reads it, and we build no op.
    compatible = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    compatible["deepspeed_shm_comm"] = False


def select_accelerator() -> str:
    """Tell DeepSpeed which accelerator to use (it picks once, on first use): cuda or cpu."""
    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def setup() -> DistInfo:
    """Initialise torch.distributed (idempotent) and DeepSpeed's accelerator for this process."""
    use_cuda = select_accelerator() == "cuda"
    launched = _read_launcher_env()
    rank, local_rank, world = launched or (0, 0, 1)
    if not launched:
        os.environ.setdefault("LOCAL_RANK", "0")  # the DeepSpeed engine insists on reading it
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        _disable_cpu_shm_comm()
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        if launched:
            torch.distributed.init_process_group(
                backend=backend, init_method="env://", rank=rank, world_size=world
            )
        else:
            # A world of one needs no rendezvous: an in-memory store, no port, no env to leak into
            # subprocesses (a child that inherited RANK/MASTER_PORT would try to join this group).
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    elif torch.distributed.get_world_size() != world:
        raise LauncherEnvError(
            f"torch.distributed is already initialised with world size {torch.distributed.get_world_size()} "
            f"but WORLD_SIZE={world}"
        )
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, device, backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
