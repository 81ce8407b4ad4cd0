"""Cheap, stable fingerprints of a target: weights, tokenizer, chat template.

They go into the store manifest so that a store (and a prepared data set) can be checked against
the target it was made with, without loading it.

``weights_hash`` is *sampled*, not a full hash, because targets are tens to hundreds of GB and the
dump must not spend minutes reading them twice. Per weight file (sorted by name) it hashes: the
file name, its size, the safetensors JSON header (every tensor's name, dtype, shape and offsets)
and 16 blocks of 64 KiB evenly spaced through the file. A different architecture, dtype or
shape changes the header; a fine-tune changes every tensor and therefore the sampled blocks.
A change confined to bytes between the sampled blocks is not detected. It reads about 1 MiB per
weight file: milliseconds, so every stage that sees both a target and what was made from it
(`train`, `export`, `evaluate`) recomputes it and compares (`check_weights`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 * 1024


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    # Prefer safetensors when both formats are present (from_pretrained does the same).
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def _safetensors_header(f, path: Path) -> bytes:
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path}: truncated safetensors file (no header length)")
    (n,) = struct.unpack("<Q", raw)
    header = f.read(n)
    if len(header) != n:
        raise ValueError(f"{path}: truncated safetensors header ({len(header)} of {n} bytes)")
    json.loads(header)  # a corrupt header is an error now, not a silently different hash
    return header


def weights_hash(model_dir: str | Path) -> str:
    """Sampled sha256 (16 hex chars) of the model's weight files; see module docstring."""
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                h.update(_safetensors_header(f, path))
            for k in range(SAMPLE_BLOCKS):
                f.seek(k * max(0, size - SAMPLE_BLOCK_BYTES) // max(1, SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()[:16]


class StaleTargetError(ValueError):
    """The target's weights changed after the features (or the drafter) were made from it."""


def check_weights(target_dir: str | Path, recorded: str, made: str, *, allow: bool = False) -> str:
    """Refuse a target whose ``weights_hash`` is not `recorded`, the hash `made` (e.g. "feature store
    data/features.zarr") was computed from; returns the current hash.

    `allow` (``target.allow_changed_weights``) turns the refusal into a pass: for weights known to
    be equivalent, e.g. the same checkpoint re-converted or re-sharded.
    """
    now = weights_hash(target_dir)
    if now != recorded and not allow:
        raise StaleTargetError(
            f"target {target_dir}: weights changed since {made} was made from it (weights_hash {recorded} "
            f"then, {now} now): features and drafter would not match the model they are used with; re-run "
            "`dspark-offline dump` with dump.overwrite=true, then train and export, or set "
            "target.allow_changed_weights=true if the new weights are equivalent (e.g. the same checkpoint "
            "re-converted)"
        )
    return now


def check_local_weights(target_cfg, recorded: str, made: str) -> tuple[Path | None, str]:
    """`check_weights` for ``params.target`` when its directory is on this machine (never converts
    the embedded target). -> (the directory or None when absent, the current hash or `recorded`
    when not checked)."""
    from dspark_offline.target.embedded import existing_target_path

    target_dir = existing_target_path(target_cfg.path, target_cfg.cache_dir)
    if target_dir is None:
        return None, recorded
    return target_dir, check_weights(target_dir, recorded, made, allow=target_cfg.allow_changed_weights)


def tokenizer_hashes(tokenizer) -> tuple[str, str]:
    """``(tokenizer_hash, chat_template_hash)``, 16 hex chars each.

    The tokenizer hash covers what decides token ids: for fast tokenizers the full serialised
    ``tokenizer.json`` (model, normaliser, pre-tokeniser, added tokens); otherwise the sorted
    vocabulary. The chat template hash covers the template text (all named templates, as sorted
    JSON, when it is a dict). Both are defined exactly as ``prepare`` writes them into the
    prepared data's ``meta.json`` (``dspark_offline.data.render``; a test keeps the two equal),
    because ``dump`` refuses prepared tokens whose hashes differ from the target's.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return (
        hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16],
        hashlib.sha256(template.encode("utf-8")).hexdigest()[:16],
    )
