"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak.

Expressed as a multiplier of the peak LR so it plugs into ``torch.optim.lr_scheduler.LambdaLR``;
DeepSpeed steps that scheduler at every optimizer step and saves its position in the
checkpoint, so a resumed run continues from the same step. The curve itself is this run's
plan (a resume with ``train.allow_param_change`` and more steps stretches it), not the
checkpoint's: the checkpoint records the plan in its ``meta.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based: the LR used by update step+1)."""

    total_steps: int
    warmup_steps: int
    min_lr_ratio: float

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # The first update already gets a non-zero LR: 1/warmup, ..., warmup/warmup.
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 1:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (decay_steps - 1))  # 0 -> 1 over the decay
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in steps; at least one step whenever a warmup was asked for."""
    if warmup_ratio <= 0:
        return 0
    return min(total_steps, max(1, round(total_steps * warmup_ratio)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupCosine
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over the optimizer's param groups (the peak LR is each group's ``lr``).

    LambdaLR saves the attributes of a callable object in its state dict and writes them back
    into the object on load, so a resumed run handed ``schedule`` itself would silently take the
    checkpoint's total/warmup steps; a plain function has no state to save or restore.
    """

    def multiplier(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=multiplier)
