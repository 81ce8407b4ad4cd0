"""Which store samples a run trains on: the ``train.max_length`` / ``train.min_loss_tokens`` filter.

Applied once, from ``lengths`` and the per-sample ``loss_mask`` only (never the hidden states);
`validate.split_validation` then holds some of the kept samples out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm


def select_samples(
    store: Any, max_length: int | None, min_loss_tokens: int, *, progress: bool = True
) -> np.ndarray:
    """Store indices of the samples to train on: at least ``min_loss_tokens`` supervised tokens
    within the first ``max_length`` tokens. Returns int64 [N_kept] in store order.

    Short samples are rejected from ``lengths`` alone; the others need their loss mask (a few
    bytes per token), read through ``store.loss_mask(i)`` rather than the whole sample.
    """
    lengths = np.asarray(store.lengths, dtype=np.int64)  # [N]
    eff = np.minimum(lengths, max_length) if max_length is not None else lengths  # [N]
    candidates = np.flatnonzero(eff >= max(min_loss_tokens, 1))
    if min_loss_tokens <= 0:
        return candidates.astype(np.int64)
    kept = []
    for i in tqdm(candidates, desc="loss-mask filter", unit="sample", disable=not progress, leave=False):
        mask = store.loss_mask(int(i))  # [S] bool, 1 byte/token
        if int(np.asarray(mask[: eff[i]]).astype(bool).sum()) >= min_loss_tokens:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)
