"""The prepared-data directory: written once by `prepare`, read by `dump` and `evaluate`.

Layout (docs/interfaces.md):

    <output>/meta.json      format, tokenizer / chat-template hashes, source, max_length,
                            seed, counts, per-split and whole `fingerprint`
    <output>/report.json    records read, kept, skipped per reason (with examples)
    <output>/{train,eval}/  input_ids.npy int32 [T], loss_mask.npy uint8 [T],
                            offsets.npy int64 [N+1], sample_ids.npy int64 [N], source_ids.json

Why atomic: the directory is written under a temporary sibling name and renamed into place
with meta.json written last, so an interrupted prepare never leaves something that loads as
complete. `PreparedSplit.load` re-hashes the arrays against meta.json, so a hand-edited or
half-copied directory is refused too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dspark_offline.data.errors import PreparedDataError

FORMAT = "dspark-offline-prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
_DTYPES = {"input_ids": np.int32, "loss_mask": np.uint8, "offsets": np.int64, "sample_ids": np.int64}


@dataclass
class SplitArrays:
    """One split in memory, exactly what goes to disk."""

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]
    offsets: np.ndarray  # int64 [N+1]; sample i = [offsets[i], offsets[i+1])
    sample_ids: np.ndarray  # int64 [N]
    source_ids: list[str] = field(default_factory=list)  # [N]

    @classmethod
    def from_samples(
        cls, ids: list[np.ndarray], masks: list[np.ndarray], sample_ids: list[int], source_ids: list[str]
    ) -> SplitArrays:
        lengths = np.array([len(x) for x in ids], dtype=np.int64)  # [N]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)  # [N+1]
        np.cumsum(lengths, out=offsets[1:])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt)
        return cls(
            input_ids=cat(ids, np.int32),
            loss_mask=cat(masks, np.uint8),
            offsets=offsets,
            sample_ids=np.asarray(sample_ids, dtype=np.int64).reshape(-1),
            source_ids=list(source_ids),
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in _DTYPES:
            a = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.data)
        h.update(json.dumps(self.source_ids).encode("utf-8"))
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, Any]:
        n = len(self.offsets) - 1
        tokens = len(self.input_ids)
        return {
            "samples": n,
            "tokens": tokens,
            "supervised_tokens": int(self.loss_mask.sum(dtype=np.int64)),
            "mean_length": round(tokens / n, 1) if n else 0.0,
        }


def dataset_fingerprint(split_fingerprints: dict[str, str]) -> str:
    text = ",".join(f"{name}:{split_fingerprints[name]}" for name in SPLITS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_prepared(out_dir: str | Path, splits: dict[str, SplitArrays], meta: dict, report: dict) -> dict:
    """Write both splits atomically; returns the final meta (with counts and fingerprints)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PreparedDataError(f"{out}: prepare output exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, splits={})
    for name in SPLITS:
        arrays = splits[name]
        d = tmp / name
        d.mkdir(parents=True)
        for key, dtype in _DTYPES.items():
            np.save(d / f"{key}.npy", np.asarray(getattr(arrays, key), dtype=dtype))
        (d / "source_ids.json").write_text(json.dumps(arrays.source_ids) + "\n")
        meta["splits"][name] = dict(arrays.counts(), fingerprint=arrays.fingerprint())
    meta["fingerprint"] = dataset_fingerprint({n: meta["splits"][n]["fingerprint"] for n in SPLITS})
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the directory complete
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return meta


class PreparedSplit:
    """Random access to one split: `ids, mask = split[i]` (np.int32 [S], np.uint8 [S])."""

    def __init__(self, root: Path, split: str, meta: dict, arrays: SplitArrays):
        self.root, self.split, self.meta = root, split, meta
        self._a = arrays
        self.lengths = np.diff(arrays.offsets)  # int64 [N]

    @classmethod
    def load(cls, directory: str | Path, split: str, verify: bool = True) -> PreparedSplit:
        """Open `directory/split`; `PreparedDataError` naming the path if missing, partial or altered."""
        root = Path(directory)
        if split not in SPLITS:
            raise PreparedDataError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not root.is_dir():
            raise PreparedDataError(f"{root}: prepared data not found (run `dspark-offline prepare`)")
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise PreparedDataError(f"{meta_path}: missing; {root} is not a complete prepare output")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PreparedDataError(f"{meta_path}: not valid JSON ({err})") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise PreparedDataError(
                f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
                f"expected {FORMAT!r} v{FORMAT_VERSION}"
            )
        if split not in meta.get("splits", {}):
            raise PreparedDataError(f"{meta_path}: no entry for split {split!r}")
        d = root / split
        loaded: dict[str, np.ndarray] = {}
        for key, dtype in _DTYPES.items():
            path = d / f"{key}.npy"
            if not path.is_file():
                raise PreparedDataError(f"{path}: missing from the prepared data")
            try:
                arr = np.load(path, mmap_mode="r" if key in ("input_ids", "loss_mask") else None)
            except (ValueError, OSError) as err:
                raise PreparedDataError(f"{path}: unreadable ({err})") from None
            if arr.dtype != dtype or arr.ndim != 1:
                raise PreparedDataError(
                    f"{path}: expected 1-D {np.dtype(dtype)}, got {arr.ndim}-D {arr.dtype}"
                )
            loaded[key] = arr
        ids_path = d / "source_ids.json"
        if not ids_path.is_file():
            raise PreparedDataError(f"{ids_path}: missing from the prepared data")
        source_ids = json.loads(ids_path.read_text())
        arrays = SplitArrays(**loaded, source_ids=source_ids)
        _check_consistent(d, arrays)
        if verify and arrays.fingerprint() != meta["splits"][split].get("fingerprint"):
            raise PreparedDataError(
                f"{d}: arrays do not match the fingerprint in {meta_path} "
                f"({arrays.fingerprint()} != {meta['splits'][split].get('fingerprint')}); re-run prepare"
            )
        return cls(root, split, meta, arrays)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for split {self.split!r} with {n} samples")
        i %= n
        lo, hi = int(self._a.offsets[i]), int(self._a.offsets[i + 1])
        return np.array(self._a.input_ids[lo:hi]), np.array(self._a.loss_mask[lo:hi])  # int32 [S], uint8 [S]

    @property
    def arrays(self) -> SplitArrays:
        """The whole split as loaded (token arrays memory-mapped), e.g. to copy it unchanged."""
        return self._a

    @property
    def sample_ids(self) -> np.ndarray:
        return self._a.sample_ids  # int64 [N]

    @property
    def source_ids(self) -> list[str]:
        return self._a.source_ids

    @property
    def fingerprint(self) -> str:
        """Hash of the whole prepared data set (both splits): what a feature store records."""
        return self.meta["fingerprint"]

    @property
    def split_fingerprint(self) -> str:
        return self.meta["splits"][self.split]["fingerprint"]


def _check_consistent(d: Path, a: SplitArrays) -> None:
    if len(a.offsets) == 0:
        raise PreparedDataError(f"{d}/offsets.npy: empty; it must hold N+1 entries starting at 0")
    n = len(a.offsets) - 1
    problems = []
    if a.offsets[0] != 0:
        problems.append("offsets must start at 0")
    if int(a.offsets[-1]) != len(a.input_ids):
        problems.append(f"offsets end at {int(a.offsets[-1])} but input_ids has {len(a.input_ids)} tokens")
    if np.any(np.diff(a.offsets) < 0):
        problems.append("offsets decrease")
    if len(a.loss_mask) != len(a.input_ids):
        problems.append(f"loss_mask has {len(a.loss_mask)} entries, input_ids {len(a.input_ids)}")
    if len(a.sample_ids) != n:
        problems.append(f"sample_ids has {len(a.sample_ids)} entries for {n} samples")
    if not isinstance(a.source_ids, list) or len(a.source_ids) != n:
        problems.append(f"source_ids.json must list {n} ids")
    if problems:
        raise PreparedDataError(f"{d}: inconsistent prepared split: " + "; ".join(problems))
