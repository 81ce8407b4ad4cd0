"""DeepSpeed checkpoints plus a readable ``meta.json``, and "latest" lookup.

Layout under ``<train.output_dir>/checkpoints/``::

    latest                         DeepSpeed's tag file (name of the newest tag)
    step-00000010/
      mp_rank_00_model_states.pt   module weights + client state (DeepSpeed)
      zero_pp_rank_R_mp_rank_00_optim_states.pt   per-rank optimizer shards (ZeRO)
      meta.json                    step, epoch, sampler position, params, store fingerprint, metrics

``meta.json`` is written by rank 0 *after* every rank finished ``save_checkpoint`` (barrier),
so its presence marks a complete checkpoint: :func:`latest_checkpoint` ignores tag folders
without it (a run killed mid-save resumes from the previous one).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dspark_offline.train.dist import barrier

log = logging.getLogger(__name__)

META_FILE = "meta.json"
_TAG_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not belong to this run."""


# How torch.save reports a write that failed (e.g. a full disk) from its C++ stream writer.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def save(engine: Any, output_dir: str | Path, step: int, meta: dict, *, is_main: bool) -> Path:
    """Save the DeepSpeed state of every rank, then rank 0 writes ``meta.json``. Collective."""
    root = checkpoints_dir(output_dir)
    tag = tag_for(step)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"dspark_meta": meta})
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in _TORCH_WRITE_FAILURES):
            raise
        free = (
            f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there" if root.exists() else "no directory"
        )
        previous = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"{root / tag}: writing the checkpoint of step {step} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; {free}); it has no {META_FILE}, so "
            f"it is ignored: free space and re-run with --resume to continue from "
            f"{previous.name if previous else 'the start'}"
        ) from e
    barrier()  # all ranks' optimizer shards are on disk before the checkpoint is marked complete
    path = root / tag
    if is_main:
        tmp = path / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path / META_FILE)
        log.info("saved checkpoint %s", path)
    barrier()
    return path


def read_meta(checkpoint: str | Path) -> dict:
    """The ``meta.json`` of a checkpoint folder; raises when the checkpoint is incomplete."""
    path = Path(checkpoint) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no {META_FILE}; not a complete dspark-offline checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with ``meta.json``), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_TAG_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load(engine: Any, checkpoint: str | Path) -> dict:
    """Restore module, optimizer, LR scheduler (all ranks) and return the checkpoint's meta."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    load_path, client_state = engine.load_checkpoint(
        str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"{checkpoint}: DeepSpeed could not load this checkpoint")
    saved = (client_state or {}).get("dspark_meta", {})
    if saved.get("step") != meta.get("step"):
        raise CheckpointError(
            f"{checkpoint}: meta.json says step {meta.get('step')} "
            f"but the DeepSpeed state says {saved.get('step')}"
        )
    return meta
