"""Before decoding: is the drafter still for this target, and is its store what its manifest says?

* **Weights.** `export` records, beside the drafter, the target weights hash its features came
  from (`model.serving.PROVENANCE_FILE`); the loaded target must still hash to it
  (`target.fingerprint.check_weights`, ~1 MiB read per weight file).
* **Layers (spot check).** The target is loaded anyway, so it recomputes the states of the first
  `SPOT_TOKENS` tokens of one stored sample at *every* decoder layer, and each stored layer
  ``hidden[:, j]`` must match the layer ``layer_ids[j]`` its manifest names: closer to it than
  to any other layer by a clear margin, and within `SPOT_REL_TOL`. An edited manifest (layer
  ids relabelled, fingerprint recomputed) or features from another model fail it, naming the
  layer. Cost: one target forward over <= 32 tokens and one sample read (2 s for the default target
  on the loaded 2-core development machine, where the same plain forward took 3-4 s).

A drafter without provenance (not made by `export`) or whose store is gone is decoded with a
note saying what was not checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SPOT_TOKENS = 32
# per-token relative error: SmolLM2 stored layers match to 0.0016 (bf16), neighbours differ by >= 0.24
SPOT_REL_TOL = 0.1


class LayerMismatchError(ValueError):
    """The stored hidden states are not the target layers the store's manifest names."""


def read_provenance(drafter_dir: str | Path) -> dict:
    from dspark_offline.model.serving import PROVENANCE_FILE

    path = Path(drafter_dir) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _training_store(provenance: dict):
    """(store or None, why not): the store the drafter was trained on, while it is unchanged."""
    from dspark_offline.store import StoreError, open_store

    path = provenance.get("store")
    if not path:
        return None, "no store recorded"
    try:
        store = open_store(path, complete_only=True)
    except StoreError as e:
        return None, str(e)
    if provenance.get("store_fingerprint") not in (None, store.manifest.params_fingerprint):
        return None, f"{path} was re-dumped since the drafter was trained"
    return store, ""


def check_drafter(drafter_dir: str | Path, target, *, allow_changed_weights: bool = False) -> list[str]:
    """Refuse a stale target (`StaleTargetError`) or mislabelled store layers (`LayerMismatchError`)
    for the drafter at `drafter_dir`; returns lines saying what was checked."""
    from dspark_offline.target.fingerprint import check_weights

    provenance = read_provenance(drafter_dir)
    store, why = _training_store(provenance) if provenance else (None, "no export provenance")
    recorded = provenance.get("target_weights_hash") or (
        store.manifest.target.weights_hash if store else None
    )
    lines = []
    if recorded:
        now = check_weights(target.path, recorded, f"the drafter {drafter_dir}", allow=allow_changed_weights)
        lines.append(
            f"target weights {'unchanged' if now == recorded else 'CHANGED (allowed)'} since the dump "
            f"of {drafter_dir} (weights_hash {now})"
        )
    else:
        lines.append(f"target weights not checked for {drafter_dir}: {why}")
    if store is None:
        lines.append(f"layer spot check skipped for {drafter_dir}: {why}")
    else:
        lines.append(spot_check_layers(target.model, store))
    return lines


@torch.inference_mode()
def spot_check_layers(model: nn.Module, store, num_tokens: int = SPOT_TOKENS) -> str:
    """Compare the stored hidden states of sample 0's first tokens with the target's own, layer by layer."""
    from dspark_offline.target.capture import capture_layers, find_decoder_parts

    m = store.manifest
    got = store.arrays(0, ["input_ids", "hidden"])
    n = min(num_tokens, len(got["input_ids"]))
    ids = got["input_ids"][:n].long()  # [n]
    stored = got["hidden"][:n].float()  # [n, L, H]
    num_layers = len(find_decoder_parts(model).layers)
    device = next(model.parameters()).device
    with capture_layers(model, list(range(num_layers)), capture_final=False) as cap:
        model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1)
        states = cap.stacked()[0].float().cpu()  # [n, N, H] every layer of the target
    if stored.shape[-1] != states.shape[-1]:
        raise LayerMismatchError(
            f"{store.path}: stored hidden size {stored.shape[-1]} but the target's is {states.shape[-1]}"
        )
    # per-token relative error, averaged over tokens (so a massive-activation token does not dominate)
    diff = (stored[:, :, None, :] - states[:, None, :, :]).norm(dim=-1)  # [n, L, N]
    err = (diff / states.norm(dim=-1)[:, None, :].clamp_min(1e-6)).mean(dim=0)  # [L, N]
    worst = 0.0
    for j, layer in enumerate(m.layer_ids):
        best = int(err[j].argmin())
        claimed, nearest = float(err[j, layer]), float(err[j, best])
        if claimed > SPOT_REL_TOL or (best != layer and 2 * nearest < claimed):
            match = f"; it matches target layer {best} (error {nearest:.3g})" if best != layer else ""
            raise LayerMismatchError(
                f"{store.path}: stored hidden[:, {j}] is not target layer {layer} as the manifest's "
                f"layer_ids={m.layer_ids} say (relative error {claimed:.3g} over the first {n} tokens of "
                f"sample 0{match}): the manifest was edited or the features come from another model; "
                "re-dump the store"
            )
        worst = max(worst, claimed)
    return (
        f"layer spot check of {store.path}: stored layers {m.layer_ids} match the target "
        f"(max relative error {worst:.2g} over {n} tokens)"
    )
