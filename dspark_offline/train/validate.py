"""Held-out validation: the training objective on store samples kept out of training.

Per-step training metrics are noisy (a micro-batch or two, fresh anchors every step) and come
from the very samples being fitted. Validation scores the same held-out samples with the same
anchors at every evaluation (step 0, every ``train.val_every`` steps, the last step), so its
rows in ``metrics/val.tsv`` can be compared step with step.

The confidence BCE is not comparable that way on its own: its soft target (the acceptance
probability of the drafter being trained) spreads out as the drafter improves, which raises
the BCE's entropy floor and the excess over it. ``conf_skill`` (see
``model.confidence.confidence_skill``) scores the head against the best constant guess for the same
targets, which is.

Data parallel: rank r scores held-out items r, r + world, …; the sums are pooled over ranks
(one all-reduce per evaluation), so every rank logs the same numbers as one process would.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dspark_offline.model import LossConfig, LossSums
from dspark_offline.train.anchors import batch_anchors
from dspark_offline.train.dataset import FeatureDataset, collate
from dspark_offline.train.metrics import pool_sums
from dspark_offline.train.seeds import seed_for
from dspark_offline.train.step import drafter_of, local_sums

_SPLIT_TAG = 0x7A1  # mixed into the run seed for the held-out draw
ANCHOR_STEP = -1  # anchors are drawn as for a "step" no training step uses: fixed across evaluations


class ValidationSplitError(ValueError):
    """``train.val_samples`` cannot be held out of the usable samples."""


def split_validation(indices: np.ndarray, val_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) store indices, both in store order; the held-out draw depends on the seed only.

    Raises when ``val_samples`` would leave no sample to train on.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if val_samples == 0:
        return indices, indices[:0]
    if val_samples >= len(indices):
        raise ValidationSplitError(
            f"train.val_samples={val_samples} would hold out every one of the {len(indices)} usable samples "
            f"of the store; lower it (or set 0 for no validation)"
        )
    rng = np.random.default_rng(seed_for(seed, _SPLIT_TAG))
    held = np.zeros(len(indices), dtype=bool)
    held[rng.choice(len(indices), size=val_samples, replace=False)] = True
    return indices[~held], indices[held]


class Validator:
    """Scores a model on the held-out samples; call it at every evaluation step (all ranks)."""

    def __init__(
        self,
        dataset: FeatureDataset,
        loss_cfg: LossConfig,
        *,
        micro_batch_size: int,
        num_anchors: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.dataset = dataset
        self.loss_cfg = loss_cfg
        self.micro_batch_size = micro_batch_size
        self.num_anchors = num_anchors
        self.seed = seed
        self.device = device
        self.items = list(range(rank, len(dataset), world_size))  # this rank's share

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, model) -> dict[str, float]:
        """The metrics (``LossSums.metrics``) pooled over all held-out samples, and ``seconds``.
        Always over the whole vocabulary (a training vocabulary is set aside meanwhile), so the
        numbers are those of the exported drafter. ``model``: the DeepSpeed engine (or drafter)."""
        t0 = time.perf_counter()
        drafter = drafter_of(model)
        train_vocab = drafter.train_vocab  # scored over the whole vocabulary, as the export is served
        drafter.set_train_vocab(None)
        try:
            parts = self._score(model)
        finally:
            drafter.set_train_vocab(train_vocab)
        sums, _ = pool_sums(parts, drafter.cfg.block_size, self.device)
        out = sums.metrics(self.loss_cfg)
        out["seconds"] = time.perf_counter() - t0
        return out

    def _score(self, model) -> list[LossSums]:
        parts = []
        with torch.no_grad():
            for lo in range(0, len(self.items), self.micro_batch_size):
                batch = collate([self.dataset[k] for k in self.items[lo : lo + self.micro_batch_size]])
                anchors, keep = batch_anchors(batch, self.num_anchors, self.seed, ANCHOR_STEP)
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                parts.append(
                    local_sums(
                        model, batch, anchors.to(self.device), keep.to(self.device), self.loss_cfg
                    ).detach()
                )
        return parts
