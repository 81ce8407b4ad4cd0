"""Looking at a store: a summary (`inspect`, `format_inspect`) and an integrity check (`verify`).

`verify --quick` is `integrity.quick_check`: manifest, shapes and dtypes, the presence of every
object each array must have and every shard index, without decoding data. The full `verify`
then reads every chunk and shard back, the target head and the sample index included: each
inner chunk and each shard index carries a crc32c, so a flipped byte anywhere fails the read.
Problems are returned as strings naming the part or group, the array and the shard or chunk
object; the CLI exits non-zero when there are any (`inspect` too, after its summary: exit 2).
"""

from __future__ import annotations

import zarr

from dspark_offline.store.integrity import PLAN_TOKEN_ARRAYS, quick_check, refuse, scan
from dspark_offline.store.manifest import HEAD_ARRAYS, PART_ATTR, StoreError, parse_manifest
from dspark_offline.store.objects import all_coords, object_key, object_region, token_shards
from dspark_offline.store.plan import part_name
from dspark_offline.store.reader import open_root, part_status
from dspark_offline.store.writer import feature_specs


def _stored_bytes(group) -> int:
    return sum(arr.nbytes_stored() for _, arr in group.arrays())


def inspect(path: str) -> dict:
    """Manifest plus per-part samples, tokens, bytes on disk, bytes/token and completeness."""
    root = open_root(path)
    manifest = parse_manifest(root.attrs.asdict(), path)
    head_bytes = _stored_bytes(root["target"]) if "target" in root else 0
    parts = []
    for p in range(manifest.num_parts):
        name = part_name(p)
        complete, status = part_status(root, name)
        row = {"name": name, "complete": complete, "status": status}
        if name in root:
            attrs = root[name].attrs.asdict().get(PART_ATTR, {})
            nbytes = _stored_bytes(root[name])
            tokens = int(attrs.get("num_tokens", 0))
            row.update(
                num_samples=int(attrs.get("num_samples", 0)),
                num_tokens=tokens,
                num_positions=int(attrs.get("num_positions", 0)),
                num_shards=int(attrs.get("num_shards", 0)),
                shards_done=len(attrs.get("shards_done", [])),
                bytes=nbytes,
                bytes_per_token=round(nbytes / tokens, 1) if tokens else None,
            )
        parts.append(row)
    tokens = sum(r.get("num_tokens", 0) for r in parts)
    part_bytes = sum(r.get("bytes", 0) for r in parts)
    complete = [r["name"] for r in parts if r["complete"]]
    return {
        "path": str(path),
        "manifest": manifest.model_dump(mode="json"),
        "parts": parts,
        "problems": quick_check(root, manifest, complete),  # of the complete parts (verify --quick)
        "total": {
            "num_samples": sum(r.get("num_samples", 0) for r in parts),
            "num_tokens": tokens,
            "part_bytes": part_bytes,
            "head_bytes": head_bytes,
            "bytes_per_token": round(part_bytes / tokens, 1) if tokens else None,
            "complete": all(r["complete"] for r in parts),
        },
    }


def check_inspected(info: dict) -> None:
    """Raise `StoreIntegrityError` (one line: the first problem, how many more, what to do) when the
    inspected store failed its quick check. An unfinished store is not damaged: it passes."""
    if info["problems"]:
        raise refuse(info["path"], info["problems"])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _backend_line(backend: dict | None) -> str:
    if backend is None:
        return "hf (not recorded: store written before dspark-offline recorded its backend)"
    versions = ", ".join(f"{k} {v}" for k, v in backend["versions"].items())
    return f"{backend['name']} on {backend['device']}  ({versions})"


def _scale_note(dtypes: dict) -> str:
    scale = dtypes.get("hidden_scale")
    return f" (x {scale} scale per token per layer)" if scale else ""


def format_inspect(info: dict) -> str:
    """Readable text of an `inspect` result."""
    m, t = info["manifest"], info["manifest"]["target"]
    lines = [
        f"store      {info['path']}",
        f"format     {m['format']} v{m['format_version']}  (params_fingerprint {m['params_fingerprint']})",
        (
            f"target     {t['name']}  {t['architecture']}  N={t['num_hidden_layers']} H={t['hidden_size']} "
            f"V={t['vocab_size']}  dtype={t['dtype']}  weights {t['weights_hash']}"
        ),
        f"backend    {_backend_line(m.get('backend'))}   created by {m['created_by']}",
        (
            f"layers     {m['layer_ids']} ('{m['layer_id_convention']}' convention)   top_k={m['top_k']}   "
            f"final_hidden={'yes' if m['has_final_hidden'] else 'no'}"
        ),
        (
            f"dtypes     hidden={m['dtypes']['hidden']}{_scale_note(m['dtypes'])} "
            f"head={m['dtypes']['head']}   "
            f"shard_tokens={m['shard_tokens']} chunk_tokens={m['chunk_tokens']}   "
            f"{m['compressor']}:{m['compression_level']}"
        ),
        (
            f"data       {m['data']['prepared_path']} [{m['data']['split']}] fingerprint "
            f"{m['data']['prepared_fingerprint']}  max_length={m['data']['max_length']}"
        ),
        "",
        f"{'part':<12}{'samples':>9}{'tokens':>11}{'shards':>9}{'on disk':>12}{'B/token':>10}  status",
    ]
    for r in info["parts"]:
        bpt = r.get("bytes_per_token")
        lines.append(
            f"{r['name']:<12}{r.get('num_samples', 0):>9}{r.get('num_tokens', 0):>11}"
            f"{str(r.get('shards_done', 0)) + '/' + str(r.get('num_shards', 0)):>9}"
            f"{_human(r.get('bytes', 0)):>12}{'-' if bpt is None else bpt:>10}  {r['status']}"
        )
    tot = info["total"]
    lines.append(
        f"{'total':<12}{tot['num_samples']:>9}{tot['num_tokens']:>11}{'':>9}{_human(tot['part_bytes']):>12}"
        f"{'-' if tot['bytes_per_token'] is None else tot['bytes_per_token']:>10}  "
        f"{'complete' if tot['complete'] else 'INCOMPLETE'}   (+ head {_human(tot['head_bytes'])})"
    )
    problems = info.get("problems", [])
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        lines.append(f"integrity  DAMAGED: {problems[0]}{more}; run `dspark-offline verify {info['path']}`")
    else:
        lines.append("integrity  quick check OK (run `dspark-offline verify` to read every shard back)")
    return "\n".join(lines)


def _read_back(arr: zarr.Array, where: str, kind: str, coords, skip: set[str]) -> list[str]:
    """Decode every object of `arr` at `coords` (those not already reported); name the corrupt ones."""
    problems = []
    for c in coords:
        key = object_key(arr, c)
        if key in skip:
            continue
        try:
            arr[object_region(arr, c)]
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt object
            label = c[0] if not any(c[1:]) else list(c)
            problems.append(f"{where} {kind} {label} ({key}): corrupt ({type(e).__name__}: {e})")
    return problems


def _member(group: zarr.Group, name: str) -> zarr.Array | None:
    try:
        arr = group[name]
    except Exception:  # noqa: BLE001 - missing or unreadable: the quick check named it
        return None
    return arr if isinstance(arr, zarr.Array) else None


def _read_part(root: zarr.Group, manifest, name: str, skip: set[str]) -> list[str]:
    """Decode every shard of a part's token arrays (the sample index is decoded by the quick check)."""
    if part_status(root, name)[1] in ("missing", "creation interrupted"):
        return []
    group = root[name]
    attrs = group.attrs.asdict()[PART_ATTR]
    problems = []
    for n in [*PLAN_TOKEN_ARRAYS, *feature_specs(manifest)]:
        arr = _member(group, n)
        if arr is not None:
            shards = (
                range(int(attrs["num_shards"])) if n in PLAN_TOKEN_ARRAYS else attrs.get("shards_done", [])
            )
            problems += _read_back(arr, f"{name}/{n}", "shard", token_shards(arr, shards), skip)
    return problems


def verify(path: str, quick: bool = False) -> list[str]:
    """Every problem found in the store at `path` (empty list = the store is whole).

    `quick`: only what `integrity.quick_check` sees (no data decoded); otherwise also read every
    chunk of the target head and every shard and sample-index chunk of every part back.
    """
    try:
        root = open_root(path)
        manifest = parse_manifest(root.attrs.asdict(), path)
    except StoreError as e:
        return [str(e)]
    report = scan(root, manifest, [part_name(p) for p in range(manifest.num_parts)])
    if quick:
        return report.problems
    problems = list(report.problems)
    if "target" in root:
        for n in HEAD_ARRAYS:
            arr = _member(root["target"], n)
            if arr is not None:
                problems += _read_back(arr, f"target/{n}", "chunk", all_coords(arr), report.bad_keys)
    for p in range(manifest.num_parts):
        problems += _read_part(root, manifest, part_name(p), report.bad_keys)
    return problems
