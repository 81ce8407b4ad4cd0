"""The tensorstore engine of benchmarks/writer.py: our feature arrays, written by tensorstore.

tensorstore (the `tensorstore` or `bench` extra) writes the Zarr v3 sharded format from its own C++
thread pools, so its compression and I/O do not queue behind one Python event loop as zarr-python's
do (the reason the zarr engine of `store/background.py` uses writer processes). The dump itself can
write with it (`dump.writer_engine: tensorstore`, `store/tensorstore_engine.py`, which holds the
layout and context used here). To compare like with like, each feature array of a part is created
with the layout our store gives it, built from the manifest alone: shape [T, ...], one shard =
`shard_tokens` rows, inner chunks of `chunk_tokens` rows, the storage dtype (bf16 as its uint16
bits), fill value 0, inner codecs bytes + the store's compressor + crc32c, the shard index (bytes +
crc32c) at the end, the `logical_dtype` attribute, and every chunk stored even when it equals the
fill value (ours: `write_empty_chunks`). `check` then reads what tensorstore wrote with zarr (the
library our reader uses) and compares its zarr.json with ours, so a layout that drifted from the
store's is reported, not measured.

Timed path (as ours): per shard, a fresh buffer per array filled by the main thread (the copy the
dump does from the forward), handed to tensorstore (which may keep it: no second copy), one
transaction per shard covering all its arrays, committed asynchronously; at most `workers +
max_pending` shards in flight (ours: `workers` writing + `max_pending` queued); then every file
fsynced by the benchmark, as for ours (tensorstore's own per-file fsync is off, as in the dump:
zarr-python does not fsync either). `data_copy_concurrency` (encoding) and `file_io_concurrency` are
both limited to the worker count. CPU time is the process's (getrusage counts tensorstore's
threads).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dspark_offline.store.manifest import feature_specs
from dspark_offline.store.tensorstore_engine import array_metadata, array_spec, context


def create_arrays(part_dir: Path, manifest, num_positions: int, ctx) -> dict:
    """The part's feature arrays, created empty by tensorstore under `part_dir`."""
    import tensorstore as ts

    out = {}
    for name, (logical, trailing) in feature_specs(manifest).items():
        meta = array_metadata(manifest, logical, trailing, num_positions)
        spec = array_spec(str(part_dir / name), meta)
        out[name] = ts.open(spec, create=True, delete_existing=True, context=ctx).result()
    return out


def write_shards(arrays: dict, data: dict[str, np.ndarray], shards: int, workers: int, max_pending: int = 2):
    """Write `shards` whole shards of `data` (one shard's worth of every array) into `arrays`."""
    import tensorstore as ts

    width = len(next(iter(data.values())))
    in_flight: collections.deque = collections.deque()
    for k in range(shards):
        txn = ts.Transaction()
        staged = []
        for name, a in data.items():
            buf = np.empty_like(a)
            buf[...] = a  # the fill the dump does from the forward's output
            view = arrays[name].with_transaction(txn)[k * width : (k + 1) * width]
            staged.append(view.write(buf, can_reference_source_data_indefinitely=True))
        for f in staged:
            f.result()  # staged in the transaction (no I/O yet)
        in_flight.append(txn.commit_async())
        while len(in_flight) > workers + max_pending:
            in_flight.popleft().result()
    while in_flight:
        in_flight.popleft().result()


def measure(where: Path, manifest, data: dict[str, np.ndarray], shards: int, workers: int, cpu, fsync_tree):
    """(MB/s, MB per CPU-s, bytes on disk / logical) of tensorstore writing `shards` shards under
    `where/part-00000`; `cpu()` and `fsync_tree(dir)` are the benchmark's own."""
    part_dir = where / "part-00000"
    num_positions = shards * len(next(iter(data.values())))
    arrays = create_arrays(part_dir, manifest, num_positions, context(workers))
    before = fsync_tree(part_dir)  # the arrays' zarr.json: not part of the measurement
    t0, c0 = time.perf_counter(), cpu()
    write_shards(arrays, data, shards, workers)
    on_disk = fsync_tree(part_dir) - before
    wall, used = time.perf_counter() - t0, cpu() - c0
    logical = sum(a.nbytes for a in data.values()) * shards
    return logical / 1e6 / wall, logical / 1e6 / max(used, 1e-9), on_disk / logical


def _spec_defaults(meta: dict) -> dict:
    """`meta` with the Zarr v3 spec's defaults written out and empty optional fields dropped, so two
    writers that spell the same layout differently compare equal: zarr-python writes the `default`
    chunk key encoding's separator ("/") and the shard index location ("end"), tensorstore omits
    both; an empty `storage_transformers` or absent `dimension_names` means none."""
    out = json.loads(json.dumps(meta))
    if out.get("storage_transformers") == []:
        del out["storage_transformers"]
    if out.get("dimension_names") is None:
        out.pop("dimension_names", None)
    cke = out.get("chunk_key_encoding", {})
    if cke.get("name") == "default":
        cke.setdefault("configuration", {}).setdefault("separator", "/")
    for codec in out.get("codecs", []):
        if codec.get("name") == "sharding_indexed":
            codec.setdefault("configuration", {}).setdefault("index_location", "end")
    return out


def metadata_differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """'key: ours -> theirs' for every field of two zarr.json documents that differs (recursively)."""
    if not prefix:
        ours, theirs = _spec_defaults(ours), _spec_defaults(theirs)
    out = []
    for k in sorted(set(ours) | set(theirs), key=str):
        a, b = ours.get(k, "<absent>"), theirs.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += metadata_differences(a, b, f"{prefix}{k}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                if isinstance(x, dict) and isinstance(y, dict):
                    out += metadata_differences(x, y, f"{prefix}{k}[{i}].")
                elif x != y:
                    out.append(f"{prefix}{k}[{i}]: {x!r} -> {y!r}")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def shard_file(array_dir: Path, k: int, ndim: int) -> Path:
    """The object of token shard `k` of a per-token array (default chunk key encoding, "/")."""
    return array_dir.joinpath("c", str(k), *["0"] * (ndim - 1))


def layout(part_dir: Path, data: dict[str, np.ndarray]) -> dict[str, dict]:
    """name -> {"zarr.json": its metadata, "shard_sha256": sha256 of its shard 0} of a written part."""
    return {
        name: {
            "zarr.json": json.loads((part_dir / name / "zarr.json").read_text()),
            "shard_sha256": hashlib.sha256(shard_file(part_dir / name, 0, a.ndim).read_bytes()).hexdigest(),
        }
        for name, a in data.items()
    }


class Check(NamedTuple):
    data: list[str]  # arrays zarr reads back other than the data written
    metadata: list[str]  # zarr.json fields that differ from ours
    same_bytes: bool  # every shard object byte for byte the one our writer makes


def check(ts_part: Path, ours: dict[str, dict], data: dict[str, np.ndarray], shards: int) -> Check:
    """Compare the part tensorstore wrote at `ts_part` (`shards` copies of `data`) with ours
    (`ours`: `layout` of a part our writer wrote with the same data): zarr must read it back bit
    for bit, and its zarr.json should equal ours up to spec defaults."""
    import zarr

    bad_data, meta, same = [], [], True
    for name, a in data.items():
        got = zarr.open_array(str(ts_part / name), mode="r", zarr_format=3)[...]
        want = np.concatenate([a] * shards)
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            bad_data.append(f"{name}: zarr reads {got.dtype}{list(got.shape)} other than the data written")
        theirs = json.loads((ts_part / name / "zarr.json").read_text())
        meta += [f"{name}/zarr.json {d}" for d in metadata_differences(ours[name]["zarr.json"], theirs)]
        for k in range(shards):
            digest = hashlib.sha256(shard_file(ts_part / name, k, a.ndim).read_bytes()).hexdigest()
            same &= digest == ours[name]["shard_sha256"]
    return Check(bad_data, meta, same)
