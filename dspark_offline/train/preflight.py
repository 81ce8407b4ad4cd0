"""Refusals before step 0: what a training run must not do silently.

Each check names the parameter or flag that decides, so a user sees one line and the fix:

* the output directory must be writable, and must not hold checkpoints of an earlier run unless
  the run resumes them (``--resume``) or replaces them (``--overwrite``);
* a store with missing or unfinished parts trains only with ``--allow-partial-store``;
* the store must be the one the params describe (target, layer ids), hold ``final_hidden`` when
  ``train.l1_mode`` reads it, have readable arrays of the manifest's shapes, and on resume be the
  store the checkpoint was trained on (the drafter's own dims are built from the manifest, so
  they match it by construction);
* the sample filters (``max_length``, ``min_loss_tokens``) must leave samples to train on, and
  are blamed by name when they do not;
* a resume must rebuild the same drafter (never negotiable: the weights would not fit) with the
  same optimisation and data params (``--allow-param-change`` to accept a change).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspark_offline.config import Params
from dspark_offline.model.l1 import needs_final_hidden
from dspark_offline.outputs import check_output_dir
from dspark_offline.store import FeatureStore, StoreError, open_store
from dspark_offline.store.manifest import StoreMismatchError, check_compatible
from dspark_offline.store.plan import part_name
from dspark_offline.target.layers import resolve_layer_ids
from dspark_offline.train import checkpoint
from dspark_offline.train.dataset import SampleReadError

# train.* fields that may change on resume: where and how often things are written, memory use.
# Everything else (learning rate, schedule, batch, loss, data selection, seed, dtype) changes the run.
RESUME_FREE_FIELDS = frozenset(
    {
        "output_dir",
        "resume",
        "overwrite",
        "allow_param_change",
        "allow_partial_store",
        "save_every",
        "log_every",
        "val_every",
        "cache_gb",
        "chunk_blocks",
    }
)


class IncompleteStoreError(StoreError):
    """The store has parts that are missing or unfinished, and partial training was not allowed."""


class SampleFilterError(ValueError):
    """The sample filters leave too few samples to train on."""


def check_output_dir_for_run(params: Params) -> Path | None:
    """Refuse an unwritable output dir, and a fresh run over an earlier run's checkpoints unless
    `train.overwrite`. Returns the checkpoint to resume from (None: a fresh run)."""
    tc, out = params.train, Path(params.train.output_dir)
    check_output_dir(out, "train.output_dir")
    resume_from = checkpoint.latest_checkpoint(out) if tc.resume else None
    if resume_from is None and not tc.overwrite:
        existing = checkpoint.list_checkpoints(out)
        if existing:
            raise checkpoint.CheckpointError(
                f"train.output_dir={str(out)!r} holds {len(existing)} checkpoint(s) of an earlier run "
                f"(latest {existing[-1].name}); pass --resume (train.resume=true) to continue it, "
                "--overwrite (train.overwrite=true) to delete them and start afresh, "
                "or choose another train.output_dir"
            )
    return resume_from


def open_training_store(params: Params, say) -> FeatureStore:
    """Open the store; refuse missing or unfinished parts unless `train.allow_partial_store`."""
    path = params.dump.store
    store = open_store(path, complete_only=True)
    total = store.manifest.num_parts
    incomplete = [part_name(p) for p in range(total) if part_name(p) not in store.parts]
    if incomplete:
        samples = f"{len(store)} of the {store.manifest.data.num_samples} samples"
        if not params.train.allow_partial_store:
            raise IncompleteStoreError(
                f"{path}: {len(incomplete)} of {total} parts missing or unfinished "
                f"({', '.join(incomplete)}); finish the dump (re-run it: it resumes), "
                "or pass --allow-partial-store (train.allow_partial_store=true) "
                f"to train on the complete parts only ({samples})"
            )
        say(
            f"WARNING: training on {len(store.parts)} of {total} parts ({samples}): "
            f"{', '.join(incomplete)} missing or unfinished (train.allow_partial_store)"
        )
    return store


def check_store(store: FeatureStore, params: Params, resume_meta: dict | None = None) -> None:
    """Refuse, before step 1, a store that cannot train this run (messages name both values).

    The store must match the params (target, layer ids: `check_compatible`), hold ``final_hidden``
    for the ``l1_mode`` values that read it, read back sample 0 with the manifest's shapes, and, on
    resume, be the store the checkpoint was trained on.
    """
    m = store.manifest
    mode = params.train.l1_mode
    if needs_final_hidden(mode) and not m.has_final_hidden:
        raise StoreMismatchError(
            f"feature store ({store.path}) has_final_hidden=False but train.l1_mode={mode!r} needs "
            "has_final_hidden=True: dump with dump.store_final_hidden=true, or train with "
            "train.l1_mode=capped (the tightest bound from the top-k alone) or topk"
        )
    want_layers = resolve_layer_ids(
        params.dump.layer_ids, m.target.num_hidden_layers, params.dump.num_layer_ids
    )
    check_compatible(m, target_name=params.target.path, layer_ids=want_layers, store=store.path)
    _probe_first_sample(store, need_final_hidden=needs_final_hidden(mode))
    if resume_meta is not None and resume_meta.get("store_fingerprint") != m.params_fingerprint:
        raise StoreMismatchError(
            f"feature store ({store.path}) params_fingerprint={m.params_fingerprint} but the checkpoint "
            f"being resumed was trained on params_fingerprint={resume_meta.get('store_fingerprint')}"
        )


def _probe_first_sample(store: FeatureStore, need_final_hidden: bool) -> None:
    """Read sample 0 and check its arrays against the manifest, so a store whose arrays are
    missing or malformed fails before step 1 rather than at some later batch."""
    m = store.manifest
    try:
        s = store.sample(0)
    except Exception as e:
        raise SampleReadError(
            f"feature store ({store.path}): cannot read sample 0: {type(e).__name__}: {e}"
        ) from e
    n, L, H, K = len(s.input_ids), len(m.layer_ids), m.target.hidden_size, m.top_k
    want = {"hidden": (n, L, H), "topk_ids": (n, K), "topk_probs": (n, K)}
    if need_final_hidden:
        want["final_hidden"] = (n, H)
    for name, shape in want.items():
        t = getattr(s, name)
        got = None if t is None else tuple(t.shape)
        if got != shape:
            raise StoreMismatchError(
                f"feature store ({store.path}) sample 0 has {name} of shape {got} but the manifest "
                f"(layer_ids={list(m.layer_ids)}, hidden_size={H}, top_k={K}) needs {shape}"
            )


def check_usable(num_usable: int, num_store: int, params: Params, world_size: int) -> None:
    """When the max_length / min_loss_tokens filters leave too few samples for the validation
    hold-out plus one global batch, blame them (not val_samples or the batch size)."""
    tc = params.train
    need = tc.val_samples + tc.micro_batch_size * tc.grad_accum * world_size
    if num_usable < num_store and num_usable < need:
        raise SampleFilterError(
            f"only {num_usable} of the {num_store} store samples have "
            f"train.min_loss_tokens={tc.min_loss_tokens} supervised tokens within "
            f"train.max_length={tc.max_length}; {need} are needed (train.val_samples={tc.val_samples} "
            "+ one global batch): raise train.max_length or lower train.min_loss_tokens"
        )


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _changes(old: dict, new: dict, skip: frozenset = frozenset()) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys()) if k not in skip and a[k] != b[k]
    ]


def check_resume(meta: dict, params: Params, draft_config: dict, resume_from: Path, say) -> None:
    """Refuse resuming `resume_from` with another drafter architecture (always) or other training
    params (unless `train.allow_param_change`, then each change is said)."""
    now = json.loads(json.dumps(draft_config))  # tuples -> lists, as meta.json has them
    arch = _changes(meta.get("draft_config", {}), now)
    if arch:
        raise checkpoint.CheckpointError(
            f"{resume_from}: the drafter architecture differs from the checkpoint's ({'; '.join(arch)}); "
            "resume with the draft params it was trained with, or start a new run "
            "(--overwrite or another train.output_dir)"
        )
    old_train = meta.get("params", {}).get("train", {})
    changed = _changes(old_train, params.train.model_dump(mode="json"), RESUME_FREE_FIELDS)
    if not changed:
        return
    listing = "; ".join(f"train.{c}" for c in changed)
    if not params.train.allow_param_change:
        raise checkpoint.CheckpointError(
            f"{resume_from}: training params differ from the checkpoint's ({listing}); resume with the same "
            "params, or pass --allow-param-change (train.allow_param_change=true) to continue with the new "
            "values (the LR schedule is then recomputed from this run's plan)"
        )
    say(f"WARNING: resuming with changed params ({listing}) (train.allow_param_change)")


def check_target_weights(store: FeatureStore, params: Params) -> str:
    """Refuse a target whose weights changed since the dump (`StaleTargetError`); returns a line
    saying what was checked.

    Training reads only the store (features and the head copy), so a changed target does not
    change what is trained; but the drafter is trained for, exported with and served beside the
    target at ``target.path``, so its weights must still be the ones the features came from.
    Checked when the target directory is on this machine (the hash reads ~1 MiB per weight
    file); a store trained on a machine without the target is checked again by export/evaluate.
    """
    from dspark_offline.target.fingerprint import check_local_weights

    recorded = store.manifest.target.weights_hash
    target_dir, now = check_local_weights(params.target, recorded, f"the feature store {store.path}")
    if target_dir is None:
        return (
            f"target weights not checked: {params.target.path} is not a local model directory here "
            "(export and evaluate check them)"
        )
    if now != recorded:
        return (
            f"target weights changed since the dump ({recorded} -> {now}), "
            "accepted: target.allow_changed_weights"
        )
    return f"target weights unchanged since the dump (weights_hash {now})"
