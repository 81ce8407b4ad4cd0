"""Start the Markov head as a bigram model of the training data (``train.markov_init: bigram``).

The Markov head adds ``W2 · W1[prev]`` to the block logits: a rank-r bigram table. Learned from
N(0, 0.02) noise it needs many steps before it beats even a count-based bigram model, and a
CPU-sized run never gets there. The table can be read off the data instead: count the pairs
(x[t], x[t+1]) of supervised tokens, smooth each row towards the unigram distribution, take
the log, centre each row (softmax ignores a per-row constant) and keep the best rank-r
approximation ``U S Vᵀ`` (truncated SVD): ``W1 = U √S``, ``W2 = V √S``. Training then refines
it together with the rest of the drafter.

The table covers the ``vocab`` ids only (the training vocabulary, or the most frequent tokens
when there is none); rows and columns of other ids keep their random initial values.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

SMOOTHING = 1.0  # pseudo-counts of the unigram distribution added to every row


@torch.no_grad()
def bigram_factors(
    store, indices: np.ndarray, vocab: torch.Tensor, rank: int, *, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W1 rows [Vs, r], W2 rows [Vs, r], share of the centred log table the rank-r factors explain)
    for the ids ``vocab`` [Vs] from the supervised token pairs of the store samples ``indices``."""
    v_total = int(store.manifest.target.vocab_size)
    index = torch.full((v_total,), -1, dtype=torch.int64)
    index[vocab] = torch.arange(len(vocab))
    n = len(vocab)
    counts = torch.zeros(n * n, dtype=torch.float32)  # [Vs·Vs] flat (prev, next)
    for i in tqdm(indices, desc="bigram table", unit="sample", disable=not progress, leave=False):
        a = store.arrays(int(i), ["input_ids", "loss_mask"])
        ids, m = index[a["input_ids"].long()], a["loss_mask"].bool()  # [S]
        ok = m[:-1] & m[1:] & (ids[:-1] >= 0) & (ids[1:] >= 0)  # [S-1]
        counts.index_add_(0, ids[:-1][ok] * n + ids[1:][ok], torch.ones(int(ok.sum())))
    counts = counts.view(n, n)  # [prev, next]
    unigram = (counts.sum(0) + 1.0) / (counts.sum() + n)  # [Vs], add-one so no zero
    table = torch.log((counts + SMOOTHING * unigram) / (counts.sum(1, keepdim=True) + SMOOTHING))
    table -= table.mean(dim=1, keepdim=True)
    r = min(rank, n)
    u, s, v = torch.svd_lowrank(table, q=r, niter=4, M=None)  # u [Vs, r], s [r], v [Vs, r]
    explained = float((s**2).sum() / (table**2).sum())
    root = s.sqrt()
    return u * root, v * root, explained


def init_markov_bigram(
    model, store, indices: np.ndarray, vocab: torch.Tensor, *, progress: bool = True
) -> float:
    """Overwrite the Markov head rows of ``vocab`` with the bigram factors; returns the explained
    share. The head's rank r must be <= len(vocab) for an exact rank-r fit (else the rest stays 0)."""
    head = model.markov_head
    if head is None:
        raise ValueError("train.markov_init='bigram' needs the Markov head (draft.markov_head: true)")
    w1, w2, explained = bigram_factors(
        store, indices, vocab, head.markov_w1.weight.shape[1], progress=progress
    )
    with torch.no_grad():
        r = w1.shape[1]
        head.markov_w1.weight[vocab] = 0.0
        head.markov_w2.weight[vocab] = 0.0
        head.markov_w1.weight[vocab, :r] = w1.to(head.markov_w1.weight.dtype)
        head.markov_w2.weight[vocab, :r] = w2.to(head.markov_w2.weight.dtype)
    return explained
