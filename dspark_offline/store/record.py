"""The completion record: a feature store's identity for DVC, in a few hundred bytes (DESIGN.md §3).

DVC hashes its outputs and dependencies byte for byte. With the store as an output of `dump` and
a dependency of `train`, it read every byte of the store after each dump and whenever mtimes
changed: minutes on a few GB, about a day at 40 TB. So the store directory is not known to DVC
at all; the dump stage's output, and the train stage's dependency, is `<store>.complete.json`:

* written by `dump` only when every part of the store is complete (by whichever dump process
  completes the last part; several workers finishing at once write the same bytes), and removed
  when a dump starts, so nothing partial is ever recorded complete;
* deterministic: the same store gives the same bytes, so a re-run dump that had nothing to do
  leaves DVC nothing to re-run downstream;
* what it holds: the manifest's `params_fingerprint` and a hash of the whole manifest; per part
  its counts and a sha256 over the index of every shard of every array (offset and size of each
  inner chunk) and over the crc32c that ends every chunk of the unsharded arrays (sample index);
  the same over the target head's chunks;
* cheap: one small suffix read per object (shard or chunk), no data decoded; the same reads the
  quick check (`integrity.py`) makes, so its cost grows with the number of shards, not their size.

Because DVC no longer looks at the store, the train stage checks that the store is still the one
recorded (`check_record`) and refuses a store changed or deleted behind DVC's back. What the
record cannot see: a feature chunk rewritten in place with bytes of the same compressed size (its
shard index does not change); the full `verify` catches that (crc32c of every chunk).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import zarr

from dspark_offline.store.manifest import MANIFEST_ATTR, PART_ATTR, StoreError, parse_manifest
from dspark_offline.store.objects import all_coords, object_key, read_suffixes, shard_index_bytes
from dspark_offline.store.plan import part_name
from dspark_offline.store.reader import open_root, part_status

RECORD_SUFFIX = ".complete.json"
RECORD_FORMAT = "dspark-offline-completion-record"
RECORD_VERSION = 1
_CRC_BYTES = 4  # every chunk of our codec chain ends with its crc32c (writer.compressors)


class StoreChangedError(StoreError):
    """The store is not the one its completion record describes (changed, incomplete or deleted
    since the dump recorded it), or the record is missing."""


def record_path(store: str | Path) -> str:
    """`<store>.complete.json`, beside the store (a trailing slash of the store path ignored)."""
    return str(store).rstrip("/") + RECORD_SUFFIX


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> Path:
    return Path(path.removeprefix("file://"))


def _array_digest(arr: zarr.Array, h) -> None:
    """Feed `h` with the key and the suffix (shard index, or chunk crc32c) of every object."""
    coords = all_coords(arr)
    size = shard_index_bytes(arr) or _CRC_BYTES
    for c, tail in zip(coords, read_suffixes(arr, coords, size)):
        h.update(object_key(arr, c).encode())
        h.update(b"\0" if tail is None else tail)  # legacy stores may lack all-zero chunks


def _group_digest(group: zarr.Group) -> str:
    h = hashlib.sha256()
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        h.update(name.encode())
        _array_digest(arr, h)
    return h.hexdigest()


def compute_record(store: str | Path) -> dict:
    """The completion record of the store at `store`; `StoreError` when it is missing, unreadable
    or has a part that is not complete."""
    path = str(store)
    root = open_root(path)
    attrs = root.attrs.asdict()
    m = parse_manifest(attrs, path)
    parts = {}
    for p in range(m.num_parts):
        name = part_name(p)
        part_attrs = root[name].attrs.asdict().get(PART_ATTR, {}) if name in root else {}
        if not part_attrs.get("complete"):
            raise StoreError(f"{path}: {name} is not complete")
        parts[name] = {
            "num_samples": int(part_attrs["num_samples"]),
            "num_tokens": int(part_attrs["num_tokens"]),
            "num_shards": int(part_attrs["num_shards"]),
            "objects_sha256": _group_digest(root[name]),
        }
    manifest_blob = json.dumps(attrs[MANIFEST_ATTR], sort_keys=True, separators=(",", ":")).encode()
    return {
        "format": RECORD_FORMAT,
        "record_version": RECORD_VERSION,
        "params_fingerprint": m.params_fingerprint,
        "manifest_sha256": hashlib.sha256(manifest_blob).hexdigest(),
        "num_parts": m.num_parts,
        "num_samples": m.data.num_samples,
        "num_tokens": m.data.num_tokens,
        "target_head_sha256": _group_digest(root["target"]),
        "parts": parts,
    }


def is_complete(store: str | Path) -> bool:
    """Whether every part of the store at `store` is complete (attrs only; nothing decoded)."""
    root = open_root(str(store))
    m = parse_manifest(root.attrs.asdict(), str(store))
    return all(part_status(root, part_name(p))[0] for p in range(m.num_parts))


def _dumps(record: dict) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def write_record(store: str | Path) -> dict:
    """Compute and write the completion record of the (complete) store; returns it. Written
    to a temporary file and renamed into place, so a reader never sees half a record."""
    record, path = compute_record(store), record_path(store)
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "w") as f:  # an object PUT is atomic
            f.write(_dumps(record))
        return record
    target = _local(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(_dumps(record))
    os.replace(tmp, target)
    return record


def remove_record(store: str | Path) -> None:
    """Remove the completion record (a dump is about to change the store); no error when absent."""
    path = record_path(store)
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            fs.rm(p)
        return
    _local(path).unlink(missing_ok=True)


def read_record(store: str | Path) -> dict | None:
    """The completion record beside `store`, or None when there is none."""
    path = record_path(store)
    try:
        if _is_url(path):
            import fsspec

            with fsspec.open(path, "r") as f:
                text = f.read()
        else:
            text = _local(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise StoreChangedError(
            f"{path}: not a completion record ({e}); remove it and re-run the dump"
        ) from e


def _differences(recorded: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if key == "parts" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                for field in sorted(set(a.get(name) or {}) | set(b.get(name) or {})):
                    x, y = (a.get(name) or {}).get(field), (b.get(name) or {}).get(field)
                    if x != y:
                        out.append(f"{name} {field}: {x} -> {y}")
        elif a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


def check_record(store: str | Path) -> dict:
    """Refuse (`StoreChangedError`) a store that is not the one its completion record describes:
    no record, the store deleted, incomplete or changed since the dump wrote the record. Returns
    the record. The fix is the same in every case: remove the record and re-run the dump (it
    resumes what is there), which writes a new one."""
    path = record_path(store)
    fix = f"remove {path} and re-run the dump (`dvc repro`; it resumes and writes a new record)"
    recorded = read_record(store)
    if recorded is None:
        raise StoreChangedError(
            f"{path}: no completion record: the dump of {store} has not finished (or was started again); "
            "run the dump to completion (`dvc repro` or `dspark-offline dump`; it resumes)"
        )
    try:
        now = compute_record(store)
    except StoreError as e:
        raise StoreChangedError(
            f"{store}: the dump recorded this store complete ({path}) but now: {e}; it was changed or "
            f"deleted behind DVC's back: {fix}"
        ) from e
    diffs = _differences(recorded, now)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise StoreChangedError(
            f"{store}: the store changed since the dump recorded it in {path} "
            f"({'; '.join(diffs[:3])}{more}); {fix}"
        )
    return recorded
