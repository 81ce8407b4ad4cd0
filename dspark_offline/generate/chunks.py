"""Resume state of a generate run: finished chunks saved beside the output until it completes.

    <generate.output>.partial/state.json        fingerprint of everything that decides the tokens
    <generate.output>.partial/chunk-00003.npz   rows, stop reasons and generated tokens of chunk 3

A chunk file is written under a temporary name and renamed into place, so a SIGKILL loses at
most the chunk in flight. The directory is a sibling of the output, not inside it: DVC deletes
a stage's outputs before running it, and the partial chunks must survive that. A run whose
fingerprint differs from `state.json` (other prepared data, target, dtype, decoding params,
library versions) discards the old chunks with a message instead of mixing them in. The
directory is removed once the final output is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK_FORMAT = 1


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ChunkResult:
    rows: np.ndarray  # int64 [n] rows of the prepared train split, in generation order
    tokens: list[np.ndarray]  # [n] int32 [G_i] generated tokens (stop token included)
    stops: list[str]  # [n] stop reason per row


class ChunkDir:
    """The `.partial` directory of one output; `say` prints a message (discarded chunks, ...)."""

    def __init__(self, output: str | Path, fields: dict, say=print):
        out = Path(output)
        self._say = say
        self.path = out.with_name(out.name + ".partial")
        self.fingerprint = fingerprint({**fields, "chunk_format": CHUNK_FORMAT})
        state = self.path / "state.json"
        if self.path.exists():
            try:
                old = json.loads(state.read_text()).get("fingerprint")
            except (OSError, ValueError):
                old = None
            if old != self.fingerprint:
                n = len(list(self.path.glob("chunk-*.npz")))
                say(
                    f"discarding {n} chunk(s) in {self.path}: made with other inputs or params "
                    f"(fingerprint {old} != {self.fingerprint})"
                )
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not state.exists():
            _atomic_write(
                state,
                (
                    json.dumps({"fingerprint": self.fingerprint, "fields": fields}, indent=2, default=str)
                    + "\n"
                ).encode(),
            )

    def _file(self, k: int) -> Path:
        return self.path / f"chunk-{k:05d}.npz"

    def done(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("chunk-*.npz"))

    def save(self, k: int, result: ChunkResult) -> None:
        lengths = np.array([len(t) for t in result.tokens], dtype=np.int32)  # [n]
        tokens = np.concatenate(result.tokens).astype(np.int32) if result.tokens else np.zeros(0, np.int32)
        tmp = self.path / f".chunk-{k:05d}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                rows=result.rows.astype(np.int64),
                lengths=lengths,
                tokens=tokens,
                stops=np.array(result.stops, dtype="U32"),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file(k))

    def load(self, k: int) -> ChunkResult | None:
        """The saved chunk, or None (file removed, with the reason) when it cannot be read."""
        path = self._file(k)
        try:
            with np.load(path, allow_pickle=False) as z:
                rows, lengths, tokens, stops = z["rows"], z["lengths"], z["tokens"], z["stops"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            self._say(f"{path}: unreadable ({err}); recomputing that chunk")
            path.unlink(missing_ok=True)
            return None
        splits = np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []
        return ChunkResult(rows=rows, tokens=list(splits), stops=[str(s) for s in stops])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
