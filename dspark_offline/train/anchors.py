"""The anchors of a training micro-batch, drawn so that they depend on the data order only."""

from __future__ import annotations

import torch

from dspark_offline.model import sample_anchors
from dspark_offline.train.seeds import seed_for


def batch_anchors(batch: dict, num_anchors: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors [Bt, A] int64 and keep [Bt, A] bool for a micro-batch.

    Each sample draws from its own generator seeded by (seed, step, dataset index). That is a
    function of the data order only, so a resumed run draws exactly the anchors of an
    uninterrupted one, and so does a run with another world size / micro-batch split of the
    same global batch (what makes 1 x micro 2 and 2 x micro 1 give identical steps).
    """
    rows = []
    for b in range(len(batch["lengths"])):
        g = torch.Generator().manual_seed(seed_for(seed, step, int(batch["index"][b])))
        n = int(batch["lengths"][b])
        rows.append(
            sample_anchors(batch["loss_mask"][b : b + 1, :n], batch["lengths"][b : b + 1], num_anchors, g)
        )
    width = max(a.shape[1] for a, _ in rows)
    anchors = torch.zeros(len(rows), width, dtype=torch.int64)  # [Bt, A], padding anchor 0
    keep = torch.zeros(len(rows), width, dtype=torch.bool)  # [Bt, A]
    for b, (a, k) in enumerate(rows):
        anchors[b, : a.shape[1]], keep[b, : k.shape[1]] = a[0], k[0]
    return anchors, keep
