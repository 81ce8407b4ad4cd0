"""The quick check: refuse a damaged store before any data is read (DESIGN.md §3).

A missing chunk or shard is an error, never a fill value. Two guards, both on by default:

* every reader reads through `strict.StrictStore`, under which an absent chunk or shard object
  raises `MissingChunkError` naming it (every read path, whenever the object went missing);
* `quick_check` (`train` and every `open_store` before reading, `verify --quick`): the manifest
  against its own fingerprint (a hand-edited manifest), every array's shape and dtype against
  the manifest (`hidden` is [T, L, H] with L = len(layer_ids)), the presence of every object
  each array must have and each shard's index (`objects.damaged_objects`), and the sample index
  against the part attrs. No chunk data is decoded: one listing per array, 16 bytes per inner
  chunk per shard and the sample index, 0.02-0.07 s on the default store of 49k tokens
  (benchmarks/integrity_check.py).

Which objects must exist is derived from each array's own metadata (shape and chunk / shard
grid), so stores written before this check are covered as well: every object of the grid for
the target head, `input_ids`, `loss_mask` and the sample index; for the feature arrays
(`hidden`, `hidden_scale`, `final_hidden`, `topk_*`) the shards the part's attrs list in `shards_done`. The
writer now creates and writes every array with `write_empty_chunks`, so an all-zero chunk is an
object like any other (part attrs `write_empty_chunks: true`). Older writers skipped all-zero
chunks in two places, the only absences tolerated in parts without that attribute: inner
chunks of gap tokens (covered by no sample) in the feature shards, and in a part of a single
sample the [0] chunk of `sample_start` / `sample_id`. (An all-zero 8 MiB chunk of the target
head is not tolerated: real weights have none.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zarr

from dspark_offline.store.dtypes import LOGICAL_DTYPE_ATTR, storage_dtype
from dspark_offline.store.manifest import (
    HEAD_ARRAYS,
    PART_ATTR,
    Manifest,
    MissingChunkError,
    StoreIntegrityError,
    feature_specs,
    fingerprint_fields,
    params_fingerprint,
)
from dspark_offline.store.objects import all_coords, damaged_objects, object_key, token_shards
from dspark_offline.store.plan import part_name
from dspark_offline.store.strict import repair_hint

PLAN_TOKEN_ARRAYS = ("input_ids", "loss_mask")
SAMPLE_ARRAYS = ("sample_id", "sample_start", "sample_length")
EVERY_CHUNK_ATTR = "write_empty_chunks"  # part attr: every chunk of every array was written


# -- the quick check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem: its line, and for a damaged object its key, array name and grid index."""

    line: str
    key: str | None = None
    array: str | None = None
    index: int | None = None
    benign: bool = False  # a state, not damage (an incomplete part a resumed dump continues)


class Report:
    """What a scan found, in order."""

    def __init__(self):
        self.findings: list[Finding] = []

    def add(self, line: str, **kw) -> None:
        self.findings.append(Finding(line, **kw))

    @property
    def problems(self) -> list[str]:
        return [f.line for f in self.findings]

    @property
    def bad_keys(self) -> set[str]:
        return {f.key for f in self.findings if f.key}


def _open_array(group: zarr.Group, name: str, where: str, report: Report) -> zarr.Array | None:
    try:
        member = group[name]
    except KeyError:
        report.add(f"{where}: array missing")
        return None
    except Exception as e:  # noqa: BLE001 - a garbled zarr.json: name it, whatever zarr raised
        report.add(f"{where}/zarr.json: metadata unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(member, zarr.Array):
        report.add(f"{where}: is a group, not an array")
        return None
    return member


def _check_array(arr, where, shape, logical, report: Report, shard_tokens: int | None = None) -> bool:
    """Shape, logical and storage dtype (and token shard size) against the manifest."""
    ok = True
    if tuple(arr.shape) != tuple(shape):
        report.add(f"{where}: shape {list(arr.shape)} but the manifest needs {list(shape)}")
        ok = False
    got = arr.attrs.get(LOGICAL_DTYPE_ATTR, str(arr.dtype))
    if got != logical or np.dtype(arr.dtype) != storage_dtype(logical):
        report.add(f"{where}: dtype {got} (stored as {arr.dtype}) but the manifest needs {logical}")
        ok = False
    if shard_tokens is not None and (arr.shards is None or arr.shards[0] != shard_tokens):
        report.add(
            f"{where}: shards of {arr.shards} tokens but the manifest says shard_tokens={shard_tokens}"
        )
        ok = False
    return ok


def _check_objects(
    arr, where: str, coords, report: Report, kind: str, tolerate: bool = False, needed=None
) -> None:
    """Report each damaged object as '<where> shard|chunk <i> (<key>): <reason>'."""
    for c, why in sorted(damaged_objects(arr, coords, needed).items()):
        if tolerate and why == "missing":
            continue
        label = c[0] if not any(c[1:]) else list(c)  # our arrays are chunked along the first axis
        key = object_key(arr, c)
        report.add(
            f"{where} {kind} {label} ({key}): {why}", key=key, array=where.rsplit("/", 1)[-1], index=c[0]
        )


def manifest_problems(m: Manifest) -> list[str]:
    """The manifest against itself: its fingerprint (catches a hand edit of any field that
    determines the arrays, e.g. layer_ids) and its layer ids against the target's layer count."""
    problems = []
    recomputed = params_fingerprint(fingerprint_fields(m))
    if recomputed != m.params_fingerprint:
        problems.append(
            f"manifest (root zarr.json) says params_fingerprint={m.params_fingerprint} but its fields "
            f"hash to {recomputed}: it was edited after the dump (layer_ids, top_k, dtypes, target ...); "
            "restore it or re-dump"
        )
    n = m.target.num_hidden_layers
    bad = [i for i in m.layer_ids if not 0 <= i < n]
    if bad or len(set(m.layer_ids)) != len(m.layer_ids):
        problems.append(f"manifest layer_ids={m.layer_ids} are not distinct ids in [0, {n}) of the target")
    return problems


def head_problems(root: zarr.Group, m: Manifest, report: Report | None = None) -> list[str]:
    """target/embed_tokens [V, H], target/lm_head [V, H], target/final_norm [H]: shapes, dtypes and
    every chunk present."""
    report = report or Report()
    V, H = m.target.vocab_size, m.target.hidden_size
    if "target" not in root:
        report.add("target: the target head group is missing")
        return report.problems
    group = root["target"]
    for name, shape in zip(HEAD_ARRAYS, ((V, H), (V, H), (H,))):
        where = f"target/{name}"
        arr = _open_array(group, name, where, report)
        if arr is not None and _check_array(arr, where, shape, m.dtypes.head, report):
            _check_objects(arr, where, all_coords(arr), report, "chunk")
    return report.problems


def part_problems(root: zarr.Group, m: Manifest, name: str, report: Report | None = None) -> list[str]:
    """One part: status, attrs against the manifest, every array's shape/dtype and objects."""
    report = report or Report()
    if name not in root:
        report.add(f"{name}: missing")
        return report.problems
    group = root[name]
    attrs = group.attrs.asdict().get(PART_ATTR)
    if not attrs or not attrs.get("created"):
        report.add(f"{name}: creation interrupted")
        return report.problems
    T, N = int(attrs["num_positions"]), int(attrs["num_samples"])
    n_shards, done = int(attrs["num_shards"]), sorted(attrs.get("shards_done", []))
    if not attrs.get("complete"):
        report.add(f"{name}: incomplete ({len(done)}/{n_shards} shards done)", benign=True)
    if attrs.get("params_fingerprint") not in (None, m.params_fingerprint):
        report.add(
            f"{name}: written with params_fingerprint={attrs['params_fingerprint']} but the manifest says "
            f"{m.params_fingerprint}: the part comes from another dump or the manifest was edited"
        )
    if n_shards != math.ceil(T / m.shard_tokens) or any(not 0 <= s < n_shards for s in done):
        report.add(
            f"{name}: attrs num_shards={n_shards}, shards_done={done} do not fit {T} positions "
            f"in shards of {m.shard_tokens}"
        )
        return report.problems
    # the sample index first: the tolerance for stores of older writers needs to know where samples are
    legacy = not attrs.get(EVERY_CHUNK_ATTR)
    before = len(report.findings)
    for n, logical in zip(SAMPLE_ARRAYS, ("int64", "int64", "int32")):
        where = f"{name}/{n}"
        arr = _open_array(group, n, where, report)
        if arr is not None and _check_array(arr, where, (N,), logical, report):
            tolerate = legacy and N == 1 and n != "sample_length"  # see the module docstring
            _check_objects(arr, where, all_coords(arr), report, "chunk", tolerate=tolerate)
    needed = None
    if len(report.findings) == before:
        try:
            _, start, length = read_sample_index(group, attrs)
        except Exception as e:  # noqa: BLE001 - a decode failure (crc32c): name it
            report.add(f"{name}: sample index unreadable ({type(e).__name__}: {e})")
        else:
            for line in sample_index_problems(name, attrs, start, length):
                report.add(line)
            if legacy:
                needed = _covered_by_samples(T, start, length)
    specs = {"input_ids": ("int32", (T,)), "loss_mask": ("uint8", (T,))}
    specs.update({n: (logical, (T, *trailing)) for n, (logical, trailing) in feature_specs(m).items()})
    for n, (logical, shape) in specs.items():
        where = f"{name}/{n}"
        arr = _open_array(group, n, where, report)
        if arr is None or not _check_array(arr, where, shape, logical, report, m.shard_tokens):
            continue
        shards = range(n_shards) if n in PLAN_TOKEN_ARRAYS else done
        _check_objects(arr, where, token_shards(arr, shards), report, "shard", needed=needed)
    return report.problems


def _covered_by_samples(T: int, start: np.ndarray, length: np.ndarray) -> Callable[[int, int], bool]:
    """Whether token rows [lo, hi) hold any sample token. Older writers did not write an inner chunk
    of gap tokens (all zeros = the fill value), so only chunks holding sample tokens must exist."""
    cover = np.zeros(T + 1, np.int64)
    np.add.at(cover, start, 1)
    np.add.at(cover, np.minimum(start + length, T), -1)
    tokens = np.concatenate([[0], np.cumsum(np.cumsum(cover)[:T] > 0)])  # [T + 1] tokens covered before row
    return lambda lo, hi: bool(tokens[min(hi, T)] > tokens[min(lo, T)])


def read_sample_index(group: zarr.Group, attrs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_id, sample_start, sample_length) int64 of a part.

    A part of one sample written before every chunk was written (no `write_empty_chunks` attr)
    may lack the chunk of `sample_id` / `sample_start` when its value is [0], the fill value
    (module docstring); that is read as [0] here and nowhere else.
    """
    out = []
    for n in SAMPLE_ARRAYS:
        try:
            out.append(group[n][...].astype(np.int64))
        except MissingChunkError:
            if attrs.get(EVERY_CHUNK_ATTR) or attrs.get("num_samples") != 1 or n == "sample_length":
                raise
            out.append(np.zeros(1, np.int64))
    return out[0], out[1], out[2]


def sample_index_problems(name: str, attrs: dict, start: np.ndarray, length: np.ndarray) -> list[str]:
    """The decoded sample index of a part against its attrs: counts, bounds, no overlap."""
    T = int(attrs["num_positions"])
    if len(start) != attrs["num_samples"] or len(length) != len(start):
        return [
            f"{name}: sample index holds {len(start)} samples but the part attrs say {attrs['num_samples']}"
        ]
    if int(length.sum()) != attrs["num_tokens"]:
        total = int(length.sum())
        return [f"{name}: sample_length sums to {total} tokens but the part attrs say {attrs['num_tokens']}"]
    if not len(start):
        return []
    order = np.argsort(start, kind="stable")
    s, n = start[order], length[order]
    if (n < 1).any() or s[0] < 0 or int((s + n).max()) > T or (s[1:] < s[:-1] + n[:-1]).any():
        what = "empty, overlapping or out-of-range samples"
        return [
            f"{name}: sample index (sample_start/sample_length) has {what} for a token axis of {T} positions"
        ]
    return []


def scan(root: zarr.Group, m: Manifest, parts: list[str]) -> Report:
    """Everything `quick_check` checks, with the keys of the objects found damaged."""
    report = Report()
    for line in manifest_problems(m):
        report.add(line)
    head_problems(root, m, report)
    for name in parts:
        part_problems(root, m, name, report)
    return report


def quick_check(root: zarr.Group, m: Manifest, parts: list[str] | None = None) -> list[str]:
    """Problems of the store (empty = whole), without decoding any data; `parts` defaults to all."""
    return scan(root, m, parts if parts is not None else [part_name(p) for p in range(m.num_parts)]).problems


def refuse(path: str, problems: list[str]) -> StoreIntegrityError:
    """One-line error for a store the quick check rejects."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return StoreIntegrityError(f"{path}: damaged feature store: {problems[0]}{more}; {repair_hint(path)}")
