"""The prompt of a prepared sample: what the target is asked to answer (evaluate, generate).

A prompt is the rendered conversation up to the first supervised token: ``ids[:i]`` where ``i``
is the first index with ``loss_mask == 1``. With the loss mask of `render.py` that prefix ends
with the first assistant header, so the target answers the first user turn as it would in
deployment ("first turn" rule; later turns are never prompts).
"""

from __future__ import annotations

import numpy as np


def prompt_from_sample(ids: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """ids [S], mask [S] -> prompt ids [P], or None when the sample has no supervised token or
    starts supervised (nothing to condition on)."""
    supervised = np.flatnonzero(mask)
    if supervised.size == 0 or supervised[0] == 0:
        return None
    return ids[: supervised[0]]
