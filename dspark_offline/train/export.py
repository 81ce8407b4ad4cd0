"""Export: a DeepSpeed training checkpoint -> the serving directory SGLang / vLLM load.

    dspark-offline export --params params.yaml            # latest checkpoint of train.output_dir
    dspark-offline export --checkpoint runs/x/checkpoints/step-00000100 --output runs/x/drafter

ZeRO shards the fp32 master weights over the ranks' optimizer files; DeepSpeed's own
``zero_to_fp32`` reassembles them on CPU (no process group, any number of training ranks).
ZeRO stage 0 checkpoints hold the whole module, which is read directly. The drafter is rebuilt
from the ``draft_config`` in the checkpoint's ``meta.json`` (not from today's params, which may
have changed since) and written by ``model.serving.save_serving``: bf16 when it was trained in
bf16, fp32 otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dspark_offline.config import Params
from dspark_offline.model import DraftModelConfig, DSparkDraft
from dspark_offline.model.serving import PROVENANCE_FILE, save_serving
from dspark_offline.outputs import OutputPathError, check_output_dir
from dspark_offline.train import checkpoint as ckpt_io
from dspark_offline.train.dist import select_accelerator

log = logging.getLogger(__name__)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 module state dict of a checkpoint folder, whatever the ZeRO stage and world size."""
    select_accelerator()
    if any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        states = checkpoint / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise ckpt_io.CheckpointError(
                f"{checkpoint}: no DeepSpeed model states ({states.name}) to export"
            )
        sd = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def recorded_weights_hash(meta: dict) -> str | None:
    """The target weights hash the drafter's features came from: recorded in the checkpoint meta
    (or export provenance), else read from the store it names while that is still the same store."""
    from dspark_offline.store import StoreError
    from dspark_offline.store.reader import read_manifest

    if meta.get("target_weights_hash") or not meta.get("store"):
        return meta.get("target_weights_hash")
    try:
        manifest = read_manifest(meta["store"])
    except StoreError:
        return None
    same = meta.get("store_fingerprint") in (None, manifest.params_fingerprint)
    return manifest.target.weights_hash if same else None


def _check_target(params: Params, meta: dict, checkpoint: Path) -> str | None:
    """Refuse to export for a target whose weights changed since the dump (`StaleTargetError`)."""
    from dspark_offline.target.fingerprint import check_local_weights

    recorded = recorded_weights_hash(meta)
    if recorded is None:
        log.warning("export: target weights not checked (no weights hash recorded for %s)", checkpoint)
        return None
    made = f"the feature store {meta.get('store')} this checkpoint was trained on"
    if check_local_weights(params.target, recorded, made)[0] is None:
        log.warning("export: target weights not checked (%s is not available here)", params.target.path)
    return recorded


def check_export_dir(params: Params) -> None:
    """Refuse an unwritable output, and a non-empty one unless ``export.overwrite``: its
    config.json may be a user's, and replacing it silently loses it."""
    out = Path(params.export.output)
    check_output_dir(out, "export.output")
    if out.is_dir() and not params.export.overwrite:
        present = sorted(p.name for p in out.iterdir())
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise OutputPathError(
                f"export.output={str(out)!r} is not empty ({shown}); "
                "pass --overwrite (export.overwrite=true) to replace the drafter files there, "
                "or choose another directory"
            )


def run(params: Params) -> dict:
    """Export ``params.export.checkpoint`` (or the latest of ``params.train.output_dir``)."""
    check_export_dir(params)
    if params.export.checkpoint is not None:
        checkpoint = Path(params.export.checkpoint)
    else:
        checkpoint = ckpt_io.latest_checkpoint(params.train.output_dir)
        if checkpoint is None:
            raise ckpt_io.CheckpointError(
                f"no complete checkpoint in {ckpt_io.checkpoints_dir(params.train.output_dir)}; "
                "train first or set export.checkpoint"
            )
    meta = ckpt_io.read_meta(checkpoint)
    if "draft_config" not in meta:
        raise ckpt_io.CheckpointError(f"{checkpoint}/{ckpt_io.META_FILE}: no 'draft_config' field")
    weights = _check_target(params, meta, checkpoint)
    cfg = DraftModelConfig(**meta["draft_config"])
    model = DSparkDraft(cfg)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(checkpoint), strict=False)
    if missing or unexpected:
        raise ckpt_io.CheckpointError(
            f"{checkpoint}: weights do not fit the drafter in meta.json: "
            f"missing {missing}, unexpected {unexpected}"
        )
    dtype = torch.bfloat16 if meta.get("dtype") == "bfloat16" else torch.float32
    out = save_serving(model, params.export.output, dtype=dtype)
    provenance = {
        "checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "store": meta.get("store"),
        "store_fingerprint": meta.get("store_fingerprint"),
        "target_weights_hash": weights,
        "metrics": meta.get("metrics", {}),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    log.info("exported %s (step %s) -> %s", checkpoint, meta.get("step"), out)
    return {"output": str(out), **provenance}
