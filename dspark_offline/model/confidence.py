"""Scoring the confidence head apart from the drafter (DESIGN §4 item 8).

The confidence BCE is hard to read on its own: its soft target t (the acceptance probability of
the drafter being trained) spreads out as the drafter improves, which raises the BCE's floor
(the entropy H(t), no predictor can beat it). `conf_skill` scores the head against the best
constant guess for the same targets; `confidence_examples` gives the head's inputs and targets
for a study of the head alone (`benchmarks/confidence_head.py`).
"""

from __future__ import annotations

import math

import torch

from .l1 import acceptance, l1_to_target
from .targets import BlockTargets


def binary_entropy(t: torch.Tensor) -> torch.Tensor:
    """H(t) = −t·log t − (1−t)·log(1−t), elementwise, 0 at t ∈ {0, 1}."""
    t = t.double()
    return (-(torch.special.xlogy(t, t) + torch.special.xlogy(1 - t, 1 - t))).float()


def confidence_skill(conf_excess: float, conf_target: float, conf_floor: float) -> float:
    """How much better the confidence head is than the best constant guess, on the same targets.

    A head that always predicts the (weighted) mean target t̄ has BCE H(t̄), so its excess over
    the floor is H(t̄) − mean H(t) (≥ 0, the spread of the targets). skill = 1 − conf_excess /
    that: 1 = perfect, 0 = no better than the constant, < 0 = worse (e.g. an untrained head).
    The raw BCE and its excess both grow as the drafter improves (its targets spread out);
    this ratio is comparable across training. NaN when the targets do not vary.
    """
    const_excess = float(binary_entropy(torch.tensor(conf_target, dtype=torch.float64))) - conf_floor
    if not (const_excess > 1e-6 and math.isfinite(conf_excess)):  # below: float32 sums' noise
        return math.nan
    return 1.0 - conf_excess / const_excess


@torch.no_grad()
def confidence_examples(
    model, block_hidden: torch.Tensor, targets: BlockTargets, l1_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The confidence head's inputs and targets, exactly as `dspark_loss` forms them: hidden
    [N, B, H] (final-norm draft states), prev [N, B] (teacher-forced previous tokens), target
    [N, B] (`clamp(1 − L1/2, 0, 1)`), weight [N, B] (`e_j·exp(−j/γ)`; 0 on unsupervised slots).

    `model` is the DSparkDraft, `block_hidden` its forward's `DraftOutput.hidden` [Bt, A, B, H],
    `targets` the batch's `block_targets`.
    """
    h = targets.select(block_hidden)
    q = torch.softmax(model.block_logits(h, targets.prev, model.train_vocab), dim=-1)  # [N, B, V']
    l1 = l1_to_target(model, q, targets.topk_ids, targets.topk_probs, targets.final_hidden, l1_mode)
    return h, targets.prev, acceptance(l1), targets.weight
