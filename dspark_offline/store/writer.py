"""Creating, resuming and filling a feature store (DESIGN.md §3).

Write protocol, chosen so that a kill at any instant leaves a store a re-run can finish:

1. root: the target head arrays (`target/...`), then the manifest in the root attrs. A manifest
   present means the head is complete. Writes are idempotent (no deletion), so several workers
   starting at once on a new store all end with the same bytes.
2. part: all arrays are created and the plan-known ones (`input_ids`, `loss_mask`, `sample_*`)
   written, then the part attrs say `created`. A part without `created` is deleted and redone.
3. shards: feature arrays are written one whole shard at a time (never a partial-shard
   read-modify-write), then the shard index is appended to the part's `shards_done`; the last
   one flips `complete`. A shard not listed is rewritten in full by the next run, so a
   sample's features never mix two runs.

A resumed run trusts nothing it cannot see: a listed shard whose object is missing or whose
index is damaged (store/integrity.py) is taken off the list and recomputed, a part whose
plan-known arrays are damaged is recreated, a damaged target head is rewritten, and a manifest
edited by hand (it no longer hashes to its fingerprint) is written back. Every
array is created with `write_empty_chunks`, so every chunk of the grid exists as an object and
an absent one is damage, never "all zeros".

Shard writes run on background workers (a thread, or worker processes) behind a bounded queue so
compression and I/O overlap the target forward (`store/background.py`); shards may finish in any
order and are recorded done as they finish; errors are re-raised in the caller's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError, GroupNotFoundError

from dspark_offline.store.dtypes import LOGICAL_DTYPE_ATTR, logical_name, storage_dtype, to_storage
from dspark_offline.store.integrity import (
    EVERY_CHUNK_ATTR,
    Report,
    head_problems,
    manifest_problems,
    part_problems,
)
from dspark_offline.store.manifest import (
    HEAD_ARRAYS,
    MANIFEST_ATTR,
    PART_ATTR,
    Manifest,
    StoreError,
    StoreMismatchError,
    feature_specs,
    fingerprint_fields,
    parse_manifest,
)
from dspark_offline.store.plan import PartPlan, ShardPlan

log = logging.getLogger(__name__)

_HEAD_CHUNK_BYTES = 8 << 20


def compressors(name: str, level: int) -> list:
    """Codec chain of every array. Crc32c last so a corrupted chunk fails loudly on read."""
    if name == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=min(level, 9), shuffle="shuffle"), Crc32cCodec()]
    if name == "none":
        return [Crc32cCodec()]
    raise ValueError(f"dump.compressor={name!r}: expected zstd, blosc or none")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(old: Manifest, new: Manifest) -> str:
    a, b = _flat(fingerprint_fields(old)), _flat(fingerprint_fields(new))
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:8]) or "(fields equal; fingerprint scheme changed)"


def backend_name(m: Manifest) -> str:
    """The backend that made a store; stores from before it was recorded were made by 'hf' (the
    vLLM backend had never run then)."""
    return m.backend.name if m.backend is not None else "hf"


def _try_open(path: str) -> zarr.Group | None:
    try:
        return zarr.open_group(path, mode="r+", zarr_format=3)
    except (FileNotFoundError, GroupNotFoundError):
        return None


def open_store_for_write(
    path: str,
    manifest: Manifest,
    head_weights: Callable[[], dict[str, torch.Tensor]],
    *,
    overwrite: bool = False,
) -> zarr.Group:
    """Create the store at `path`, or reopen it for resume when its fingerprint matches.

    A store with another `params_fingerprint` (or a foreign group) is refused unless
    `overwrite`, in which case it is deleted and recreated. `head_weights` is called only when
    the head still has to be written.
    """
    try:
        root, recreate = _try_open(path), False
    except (ValueError, TypeError, KeyError) as e:  # a garbled root zarr.json
        if not overwrite:
            raise StoreMismatchError(
                f"{path}/zarr.json: root metadata unreadable ({type(e).__name__}: {e}); "
                "set dump.overwrite=true to delete and recreate the store"
            ) from e
        root, recreate = None, True
    if root is not None:
        attrs = root.attrs.asdict()
        if MANIFEST_ATTR in attrs:
            try:
                old = parse_manifest(attrs, path)
            except StoreError as e:
                if not overwrite:
                    raise StoreMismatchError(f"{e}; set dump.overwrite=true to replace it") from e
                recreate = True
            else:
                same_backend = manifest.backend is None or backend_name(old) == backend_name(manifest)
                if old.params_fingerprint == manifest.params_fingerprint and same_backend:
                    log.info("resuming %s (params_fingerprint %s)", path, old.params_fingerprint)
                    damage = head_problems(root, manifest)
                    if damage:
                        log.warning("%s: target head damaged (%s); rewriting it", path, "; ".join(damage))
                        _write_head(root, manifest, head_weights(), replace=True)
                    edited = manifest_problems(old)
                    if edited:  # the arrays were written under this fingerprint: its manifest is this one
                        log.warning("%s: %s; writing this dump's manifest back", path, "; ".join(edited))
                        root.attrs[MANIFEST_ATTR] = manifest.model_dump(mode="json")
                    return root
                if not overwrite:
                    if old.params_fingerprint != manifest.params_fingerprint:
                        why = (
                            f"existing store has params_fingerprint={old.params_fingerprint} but this dump "
                            f"has params_fingerprint={manifest.params_fingerprint} "
                            f"({_differences(old, manifest)})"
                        )
                    else:
                        why = (
                            f"existing store was made by backend {backend_name(old)!r}, "
                            f"this dump uses {backend_name(manifest)!r}"
                        )
                    raise StoreMismatchError(
                        f"{path}: {why}; refusing to mix features of two runs - set dump.overwrite=true to "
                        "delete and recreate it"
                    )
                recreate = True
        elif set(root.keys()) - {"target"}:
            if not overwrite:
                raise StoreError(
                    f"{path}: exists but is not a dspark-offline feature store "
                    f"(members {sorted(root.keys())}, no '{MANIFEST_ATTR}' root attribute); "
                    "set dump.overwrite=true to replace it"
                )
            recreate = True
    if recreate:
        log.warning("deleting and recreating %s (dump.overwrite=true)", path)
        root = zarr.open_group(path, mode="w", zarr_format=3)
    elif root is None:
        root = zarr.open_group(path, mode="a", zarr_format=3)
    _write_head(root, manifest, head_weights())
    root.attrs[MANIFEST_ATTR] = manifest.model_dump(mode="json")
    return root


def _write_head(
    root: zarr.Group, m: Manifest, weights: dict[str, torch.Tensor], replace: bool = False
) -> None:
    """target/embed_tokens [V, H], target/lm_head [V, H], target/final_norm [H], in the head dtype.

    `replace`: recreate the arrays (a damaged head: an array's metadata may be what is broken)."""
    missing = set(HEAD_ARRAYS) - set(weights)
    if missing:
        raise ValueError(f"head_weights() lacks {sorted(missing)}")
    group = root.require_group("target")
    logical = m.dtypes.head
    for name in HEAD_ARRAYS:
        t = weights[name]
        if logical_name(t.dtype) != logical:
            raise ValueError(
                f"head weight {name} has dtype {t.dtype} but the manifest says dtypes.head={logical}"
            )
        data = to_storage(t, logical)
        row_bytes = max(1, data[0].nbytes if data.ndim > 1 else data.itemsize)
        chunks = (max(1, min(len(data), _HEAD_CHUNK_BYTES // row_bytes)), *data.shape[1:])
        try:
            arr = group.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks,
                compressors=compressors(m.compressor, m.compression_level),
                fill_value=0,
                attributes={LOGICAL_DTYPE_ATTR: logical},
                config={"write_empty_chunks": True},  # every chunk exists: an absent one is damage
                overwrite=replace,
            )
        except ContainsArrayError:  # a resumed or concurrent creation: same bytes, written again
            arr = group[name]
        arr[...] = data


class PartState:
    """One part open for writing: its plan, handles and which shards are done (single writer)."""

    def __init__(self, group: zarr.Group, plan: PartPlan, manifest: Manifest, done: set[int], complete: bool):
        self.group, self.plan, self.manifest = group, plan, manifest
        self.done, self.complete = done, complete
        self.specs = feature_specs(manifest)
        # write_empty_chunks is a runtime setting, not stored: set it on every handle that writes
        self._arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in self.specs}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.plan.name

    def pending(self) -> list[ShardPlan]:
        return [] if self.complete else [s for s in self.plan.shards if s.index not in self.done]

    def check_shard(self, shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        """Refuse arrays that are not exactly one whole shard of every feature array."""
        n = shard.stop - shard.start
        if set(arrays) != set(self.specs):
            raise ValueError(
                f"{self.name} shard {shard.index}: got arrays {sorted(arrays)}, need {sorted(self.specs)}"
            )
        for name, (logical, trailing) in self.specs.items():
            a = arrays[name]
            if a.shape != (n, *trailing) or a.dtype != storage_dtype(logical):
                raise ValueError(
                    f"{self.name}/{name} shard {shard.index}: got {a.dtype}{list(a.shape)}, "
                    f"need {storage_dtype(logical)}{[n, *trailing]}"
                )

    @property
    def handles(self) -> dict[str, zarr.Array]:
        """The feature arrays' write handles (picklable: a writer process reopens them by path)."""
        return self._arrays

    def write_shard(self, shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        """Write every feature array of one whole shard, then record it done."""
        self.check_shard(shard, arrays)
        write_arrays(self._arrays, shard, arrays)
        self.record_done(shard.index)

    def record_done(self, index: int) -> None:
        """Add shard `index` to the part's `shards_done` (any order); the last one flips `complete`."""
        with self._lock:  # writers may finish shards in any order, on other threads
            self.done.add(index)
            attrs = dict(self.group.attrs[PART_ATTR])
            attrs["shards_done"] = sorted(self.done)
            if len(self.done) == len(self.plan.shards):
                attrs.update(complete=True, status="complete")
                self.complete = True
            self.group.attrs[PART_ATTR] = attrs


def write_arrays(handles: dict[str, zarr.Array], shard: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
    """The whole-shard writes of one shard (no read-modify-write: the range is exactly the shard)."""
    for name, a in arrays.items():
        handles[name][shard.start : shard.stop] = a


def open_part(
    root: zarr.Group,
    manifest: Manifest,
    plan: PartPlan,
    tokens: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> PartState:
    """Create part `plan.name` (plan-known arrays written now) or reopen it for resume.

    `tokens()` -> (input_ids int32 [T], loss_mask uint8 [T] with gaps 0, sample_id int64 [N_p]
    in row order); called only when the part is created.
    """
    name = plan.name
    if name in root:
        group = root[name]
        attrs = group.attrs.asdict().get(PART_ATTR, {})
        if attrs.get("created"):
            expect = {
                "num_samples": plan.num_samples,
                "num_positions": plan.num_positions,
                "num_shards": len(plan.shards),
            }
            got = {k: attrs.get(k) for k in expect}
            if got != expect:
                raise StoreError(f"{name}: stored layout {got} differs from this dump's plan {expect}")
            state = _resume_part(root, plan, manifest, attrs)
            if state is not None:
                return state
        else:
            log.info("%s: removing a part whose creation was interrupted", name)
        del root[name]
    return _create_part(root, manifest, plan, *tokens())


def _resume_part(root: zarr.Group, plan: PartPlan, manifest: Manifest, attrs: dict) -> PartState | None:
    """The part's state for resuming, its damaged shards taken off `shards_done`; None when the
    part must be recreated (its plan-known arrays, sample index or any array metadata damaged)."""
    report = Report()
    part_problems(root, manifest, plan.name, report)
    damage = [f for f in report.findings if not f.benign]
    features = feature_specs(manifest)
    done = set(attrs.get("shards_done", []))
    if any(f.array not in features or f.index is None for f in damage):
        log.warning("%s: damaged (%s); recreating the part", plan.name, "; ".join(f.line for f in damage))
        return None
    if damage:
        bad = {f.index for f in damage}
        log.warning(
            "%s: recomputing shard(s) %s: %s", plan.name, sorted(bad), "; ".join(f.line for f in damage)
        )
        done -= bad
        attrs = dict(attrs, shards_done=sorted(done), complete=False, status="writing")
        root[plan.name].attrs[PART_ATTR] = attrs
    return PartState(root[plan.name], plan, manifest, done, bool(attrs.get("complete")))


def _create_part(root, manifest, plan, input_ids, loss_mask, sample_id) -> PartState:
    T, N = plan.num_positions, plan.num_samples
    if input_ids.shape != (T,) or loss_mask.shape != (T,) or sample_id.shape != (N,):
        raise ValueError(f"{plan.name}: token arrays must be [{T}] and sample_id [{N}]")
    group = root.create_group(plan.name)
    codecs = compressors(manifest.compressor, manifest.compression_level)
    shard, chunk = manifest.shard_tokens, manifest.chunk_tokens

    def token_array(name: str, logical: str, trailing: tuple[int, ...]):
        return group.create_array(
            name,
            shape=(T, *trailing),
            dtype=storage_dtype(logical),
            chunks=(chunk, *trailing),
            shards=(shard, *trailing),
            compressors=codecs,
            fill_value=0,
            attributes={LOGICAL_DTYPE_ATTR: logical},
            config={"write_empty_chunks": True},  # every written shard exists as an object (verify)
        )

    token_array("input_ids", "int32", ())[...] = input_ids.astype(np.int32)
    token_array("loss_mask", "uint8", ())[...] = loss_mask.astype(np.uint8)
    for name, (logical, trailing) in feature_specs(manifest).items():
        token_array(name, logical, trailing)
    for name, data in (
        ("sample_id", sample_id.astype(np.int64)),
        ("sample_start", plan.sample_start.astype(np.int64)),
        ("sample_length", plan.sample_length.astype(np.int32)),
    ):
        arr = group.create_array(
            name,
            shape=(N,),
            dtype=data.dtype,
            chunks=(max(N, 1),),
            compressors=codecs,
            fill_value=0,
            attributes={LOGICAL_DTYPE_ATTR: str(data.dtype)},
            config={"write_empty_chunks": True},  # [0] is the fill value and still a chunk
        )
        arr[...] = data
    complete = not plan.shards
    group.attrs[PART_ATTR] = {
        "created": True,
        "status": "complete" if complete else "writing",
        "complete": complete,
        "num_samples": N,
        "num_tokens": plan.num_tokens,
        "num_positions": T,
        "num_shards": len(plan.shards),
        "shards_done": [],
        "params_fingerprint": manifest.params_fingerprint,
        EVERY_CHUNK_ATTR: True,  # every array's every chunk is an object (store/integrity.py)
    }
    return PartState(group, plan, manifest, set(), complete)
