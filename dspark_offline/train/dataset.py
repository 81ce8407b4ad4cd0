"""Training items over a feature store: the Dataset and how its items become a batch.

* :class:`FeatureDataset` reads one sample per ``__getitem__`` through the store reader (random
  access; nothing is loaded up front). A read error is raised with the sample named, never
  papered over with another sample.
* :func:`collate` right-pads a micro-batch of its items (the same per-token fields).

Which samples (`selection.py`), in which order (`sampler.py`), with which anchors (`anchors.py`),
on how many DataLoader workers (`loader.py`; the reader reopens the store in each worker) and
whether the store fits the run at all (`preflight.check_store`) live beside it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# per-token fields of a stored sample, truncated and padded together
_TOKEN_FIELDS = ("input_ids", "loss_mask", "hidden", "final_hidden", "topk_ids", "topk_probs")


class SampleReadError(RuntimeError):
    """Reading one sample from the store failed; the message names the sample."""


class FeatureDataset(Dataset):
    """Random access to the kept samples of a store; item ``k`` is store sample ``indices[k]``.

    With ``cache_bytes`` > 0 the decoded items are kept in memory until they fill it (first come,
    first kept), so later epochs skip the store for them. Items are returned as stored: callers
    must not modify their tensors in place (`collate` copies them into new batch tensors).
    """

    def __init__(self, store: Any, indices: np.ndarray, max_length: int | None, cache_bytes: int = 0) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.max_length = max_length
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, dict[str, Any]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        out = self._read(k)
        size = sum(t.numel() * t.element_size() for t in out.values() if isinstance(t, torch.Tensor))
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[k] = out
            self._cached_bytes += size
        return out

    def _read(self, k: int) -> dict[str, Any]:
        i = int(self.indices[k])
        try:
            s = self.store.sample(i)
        except Exception as e:  # re-raised with the sample named; never substituted
            raise SampleReadError(
                f"failed to read sample {i} (dataset item {k}) from the feature store: {e}"
            ) from e
        out: dict[str, Any] = {"index": k, "store_index": i, "sample_id": int(s.sample_id)}
        for name in _TOKEN_FIELDS:
            t = getattr(s, name)
            out[name] = None if t is None else t[: self.max_length]  # [S', ...]
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad a micro-batch. Padding: token 0, loss_mask False, features 0; ``lengths`` marks it.

    Returns input_ids [Bt, S] int64, loss_mask [Bt, S] bool, hidden [Bt, S, L, H],
    final_hidden [Bt, S, H] | None, topk_ids [Bt, S, K] int64, topk_probs [Bt, S, K] float32,
    lengths [Bt] int64, index / store_index / sample_id [Bt] int64.
    """
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.int64)  # [Bt]
    s_max = int(lengths.max())
    batch: dict[str, Any] = {"lengths": lengths}
    for key in ("index", "store_index", "sample_id"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.int64)
    for name in _TOKEN_FIELDS:
        rows = [it[name] for it in items]
        if any(r is None for r in rows):
            batch[name] = None
            continue
        first = rows[0]
        out = _batch_tensor((len(rows), s_max, *first.shape[1:]), first.dtype)  # [Bt, S, ...]
        for b, r in enumerate(rows):
            out[b, : len(r)] = r
            out[b, len(r) :] = 0  # padding
        batch[name] = out
    return batch


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor; inside a DataLoader worker it is allocated in shared memory
    at once, as torch's default_collate does, so handing the batch to the training process costs
    no second copy of it (the features are tens of MB per sample at 8B-target widths)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape))
    return proto.new(storage).resize_(shape)
