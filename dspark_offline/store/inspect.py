"""Looking at a store: a summary (`inspect`, `format_inspect`) and a full integrity check (`verify`).

`verify` reads every shard back. Each inner chunk and each shard index carries a crc32c, so a
flipped byte anywhere in a shard object fails the read; a shard object that is absent would
silently read as zeros, so its existence is checked explicitly. Problems are returned as
strings naming the part, array and shard; the CLI exits non-zero when there are any.
"""

from __future__ import annotations

from zarr.core.sync import sync

from dspark_offline.store.manifest import Manifest, StoreError, parse_manifest
from dspark_offline.store.plan import part_name
from dspark_offline.store.reader import open_root, part_status
from dspark_offline.store.writer import HEAD_ARRAYS, PART_ATTR, feature_specs

_PLAN_TOKEN_ARRAYS = ("input_ids", "loss_mask")
_SAMPLE_ARRAYS = ("sample_id", "sample_start", "sample_length")


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
    return {
        "path": str(path),
        "manifest": manifest.model_dump(mode="json"),
        "parts": parts,
        "total": {
            "num_samples": sum(r.get("num_samples", 0) for r in parts),
            "num_tokens": tokens,
            "part_bytes": part_bytes,
            "head_bytes": head_bytes,
            "bytes_per_token": round(part_bytes / tokens, 1) if tokens else None,
            "complete": all(r["complete"] for r in parts),
        },
    }


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
            f"dtypes     hidden={m['dtypes']['hidden']} head={m['dtypes']['head']}   "
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
    return "\n".join(lines)


def _check_shards(arr, where: str, shards: list[int], shard_tokens: int) -> list[str]:
    """Read back the given shards of `arr` (token axis first); report missing or corrupt ones."""
    problems = []
    store, base = arr.store_path.store, arr.store_path.path
    T = arr.shape[0]
    for s in shards:
        key = arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))
        if not sync(store.exists(f"{base}/{key}" if base else key)):
            problems.append(f"{where} shard {s} ({key}): missing")
            continue
        try:
            arr[s * shard_tokens : min((s + 1) * shard_tokens, T)]
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt shard
            problems.append(f"{where} shard {s} ({key}): corrupt ({type(e).__name__}: {e})")
    return problems


def _verify_part(root, manifest: Manifest, name: str) -> list[str]:
    complete, status = part_status(root, name)
    if status in ("missing", "creation interrupted"):
        return [f"{name}: {status}"]
    group = root[name]
    attrs = group.attrs.asdict()[PART_ATTR]
    problems = [] if complete else [f"{name}: incomplete ({status})"]
    n_shards, shard = int(attrs["num_shards"]), manifest.shard_tokens
    done = sorted(attrs.get("shards_done", []))
    arrays = {n: group[n] for n, _ in group.arrays()}
    needed = [*_PLAN_TOKEN_ARRAYS, *_SAMPLE_ARRAYS, *feature_specs(manifest)]
    for missing in [n for n in needed if n not in arrays]:
        problems.append(f"{name}/{missing}: array missing")
    for n in _PLAN_TOKEN_ARRAYS:
        if n in arrays:
            problems += _check_shards(arrays[n], f"{name}/{n}", list(range(n_shards)), shard)
    for n in feature_specs(manifest):
        if n in arrays:
            problems += _check_shards(arrays[n], f"{name}/{n}", done, shard)
    try:
        start = group["sample_start"][...]
        length = group["sample_length"][...]
        group["sample_id"][...]
    except Exception as e:  # noqa: BLE001
        return [*problems, f"{name}: sample index unreadable ({type(e).__name__}: {e})"]
    if len(start) != attrs["num_samples"] or int(length.sum()) != attrs["num_tokens"]:
        problems.append(f"{name}: sample index disagrees with part attrs (samples/tokens)")
    elif len(start) and int((start + length).max()) > attrs["num_positions"]:
        problems.append(f"{name}: a sample ends past the token axis ({attrs['num_positions']})")
    return problems


def verify(path: str) -> list[str]:
    """Every problem found in the store at `path` (empty list = the store is whole)."""
    try:
        root = open_root(path)
        manifest = parse_manifest(root.attrs.asdict(), path)
    except StoreError as e:
        return [str(e)]
    problems = []
    for n in HEAD_ARRAYS:
        try:
            root[f"target/{n}"][...]
        except KeyError:
            problems.append(f"target/{n}: array missing")
        except Exception as e:  # noqa: BLE001
            problems.append(f"target/{n}: corrupt ({type(e).__name__}: {e})")
    for p in range(manifest.num_parts):
        problems += _verify_part(root, manifest, part_name(p))
    return problems
