"""Which dump worker this process is, when a launcher started it (torchrun, deepspeed, srun).

A multi-GPU or multi-node dump is N independent processes, each writing its own parts of the
store (no process group, no communication). Under a launcher each process learns its place from
the environment the launcher sets:

* torchrun and the `deepspeed` launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
* Slurm ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``. Only a job step
  started by srun counts: a batch script itself also sees ``SLURM_PROCID=0`` and the job's
  ``SLURM_NTASKS``, and must not take itself for rank 0 of N and write only a fraction of the parts.

torchrun's variables win when both are set (torchrun started by srun, one per node). Rank r of
W writes parts r, r + W, r + 2W, ... of ``dump.num_parts`` (default: W, one part per rank), which
must be a multiple of W; an explicit ``dump.part_index`` overrides the launcher (that process
writes that one part). On CUDA each rank takes the GPU of its local rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from dspark_offline.errors import UserError


class LaunchError(UserError):
    """A launcher environment or part assignment that cannot work (named variables and values)."""


@dataclass(frozen=True)
class Launch:
    """This process's place among the launched workers."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # what set the variables, for messages: 'torchrun/deepspeed' or 'srun'


_SCHEMES = (
    ("torchrun/deepspeed", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


def from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None when no launcher set the variables."""
    env = os.environ if env is None else env
    for launcher, rank_var, world_var, local_var in _SCHEMES:
        if rank_var in env and world_var in env:
            rank, world = _int(env, rank_var), _int(env, world_var)
            local = _int(env, local_var) if local_var in env else 0
            if world < 1 or not 0 <= rank < world or local < 0:
                raise LaunchError(
                    f"{launcher} environment {rank_var}={rank}, {world_var}={world}, {local_var}={local} "
                    f"is inconsistent (need 0 <= {rank_var} < {world_var}, {local_var} >= 0)"
                )
            return Launch(rank, world, local, launcher)
    return None


def assign_parts(
    num_parts: int | None, part_index: int | None, launch: Launch | None
) -> tuple[int, list[int]]:
    """(num_parts of the store, the parts this process writes).

    `num_parts` None = one part per rank (1 without a launcher); `part_index` set = that part only,
    whatever the launcher says; under a launcher rank r of W writes r, r + W, ..."""
    world = launch.world_size if launch else 1
    total = world if num_parts is None else num_parts
    if part_index is not None:
        if part_index >= total:
            raise LaunchError(f"dump.part_index={part_index} must be < dump.num_parts={total}")
        return total, [part_index]
    if launch is None:
        return total, list(range(total))
    if total % world:
        raise LaunchError(
            f"dump.num_parts={total} is not a multiple of the {world} processes of this {launch.launcher} "
            f"launch: set dump.num_parts to a multiple of {world} (unset = one part per process), "
            "or give each process its part with --part-index"
        )
    return total, list(range(launch.rank, total, world))


def local_device(device: str, launch: Launch | None, visible_gpus: int) -> str:
    """The target device of this rank: its local GPU when the target runs on CUDA ('cuda', or
    'auto' with GPUs visible) under a launcher; an explicit 'cuda:N' or 'cpu' is kept.

    A launcher that already binds one GPU per process (Slurm ``--gpus-per-task=1``) leaves one
    visible: that is the rank's GPU, cuda:0."""
    if launch is None or device not in ("auto", "cuda") or visible_gpus == 0:
        return device
    if visible_gpus == 1:
        return "cuda:0"
    if launch.local_rank >= visible_gpus:
        raise LaunchError(
            f"{launch.launcher}: local rank {launch.local_rank} but only {visible_gpus} GPUs are visible to "
            "this process: start at most one dump process per GPU on each node"
        )
    return f"cuda:{launch.local_rank}"


def vllm_visible_devices(launch: Launch | None, visible: str | None, visible_gpus: int) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` this rank's vLLM engine must see (vLLM picks its GPUs from that
    variable, not from a device index), or None to leave it as it is: no launcher, or one GPU
    visible already. `visible` is the current value, `visible_gpus` the GPUs this process sees."""
    if launch is None:
        return None
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else None
    if ids is None:
        ids = [str(i) for i in range(visible_gpus)]
    if len(ids) <= 1:
        return None
    if launch.local_rank >= len(ids):
        raise LaunchError(
            f"{launch.launcher}: local rank {launch.local_rank} but CUDA_VISIBLE_DEVICES has {len(ids)} GPUs "
            f"({','.join(ids)}): start at most one dump process per GPU on each node"
        )
    return ids[launch.local_rank]
