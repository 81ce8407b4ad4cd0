"""The training vocabulary: the target tokens a drafter is trained to score (``train.vocab_size``).

Why: a training step spends most of its time on the draft logits, their softmax and the L1 over
the whole vocabulary (V = 49,152 for SmolLM2, 151,936 for Qwen3), B times per block. Chat data
uses a small part of it: on the embedded default the 8,192 tokens the target finds most likely
hold 99 % of its top-1 choices. Training over such a subset makes those terms V/Vs times
cheaper; the drafter's parameters and serving format do not change (serving still scores all
of V, and a token the drafter never saw in training simply keeps its untrained logit).

The choice is made once per run from the training samples alone (never the held-out ones):
each token scores the target probability it receives on supervised positions (the cached
top-k) plus one per occurrence as a supervised token. The Vs highest scores win; ties break
by token id, so the set is a function of the store and the sample indices.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def training_vocabulary(store, indices: np.ndarray, size: int, *, progress: bool = True) -> torch.Tensor:
    """Sorted int64 ids [min(size, V)] of the ``size`` tokens with the most target mass and
    supervised occurrences over the store samples ``indices``."""
    vocab_size = int(store.manifest.target.vocab_size)
    if size >= vocab_size:
        return torch.arange(vocab_size)
    score = torch.zeros(vocab_size, dtype=torch.float64)  # [V]
    for i in tqdm(indices, desc="training vocabulary", unit="sample", disable=not progress, leave=False):
        a = store.arrays(int(i), ["input_ids", "loss_mask", "topk_ids", "topk_probs"])
        m = a["loss_mask"].bool()  # [S]
        score.index_add_(0, a["topk_ids"][m].long().flatten(), a["topk_probs"][m].double().flatten())
        score.index_add_(0, a["input_ids"][m].long(), torch.ones(int(m.sum()), dtype=torch.float64))
    # stable sort on -score: equal scores keep id order, so the choice is deterministic
    order = torch.sort(-score, stable=True).indices
    return order[:size].sort().values
