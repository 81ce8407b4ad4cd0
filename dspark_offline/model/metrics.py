"""The objective's local sums and every metric derived from them, in one place.

`dspark_loss` returns a `LossSums` per batch; training, validation and the benchmarks add the
sums of their batches (and ranks: `as_vector` is what one all-reduce carries) and call
`metrics`. Every metric is a ratio of pooled sums, so a pooled metric is exactly the one a
single process with all the batches would compute:

- `loss`: α_ce·ce + α_l1·l1 + α_conf·conf (the objective per unit of weight);
- `ce`, `l1`, `conf` (the confidence BCE), `conf_target` (mean soft target t), `conf_floor`
  (mean entropy H(t), the BCE's lower bound): means weighted by w_j = e_j·exp(−j/γ);
- `conf_excess` = conf − conf_floor (a KL, ≥ 0) and `conf_skill` (`confidence.confidence_skill`);
- `acc`, `outside_vocab` (share of labels outside the training vocabulary), and with
  `per_slot=True` `acc_slot{j}`, `accept_slot{j}` (mean acceptance probability of slot j): per
  supervised slot;
- `tau_probabilistic` = 1 + Σ_j Π_{i≤j} accept_i and `tau_greedy` (1 + the leading slots whose
  argmax is the target's top-1, i.e. what greedy verification accepts given the data's prefix):
  per supervised block;
- `supervised_tokens`: the supervised slots (Σ e_j).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from .confidence import confidence_skill

if TYPE_CHECKING:
    from .loss import LossConfig

_SCALARS = ("ce", "l1", "bce", "conf_target", "conf_floor", "weight", "tau", "greedy", "outside", "blocks")
_PER_SLOT = ("correct", "accept", "tokens")


@dataclass
class LossSums:
    """Sums over a batch's supervised slots (or blocks). ce / l1 / bce carry gradients (the
    objective, `train/` normalises and backpropagates it); the others are statistics."""

    ce: torch.Tensor  # [] Σ CE·w (+ 0·Σh, which keeps every backbone parameter in the graph)
    l1: torch.Tensor  # [] Σ L1·w
    bce: torch.Tensor  # [] Σ BCE·w of the confidence head (0 without one)
    conf_target: torch.Tensor  # [] Σ t·w, t = clamp(1 − L1/2, 0, 1) (0 without a head)
    conf_floor: torch.Tensor  # [] Σ H(t)·w (0 without a head)
    weight: torch.Tensor  # [] Σ w
    tau: torch.Tensor  # [] Σ over blocks of 1 + Σ_j Π_{i≤j} accept_i
    greedy: torch.Tensor  # [] Σ over blocks of 1 + leading top-1 matches
    outside: torch.Tensor  # [] supervised labels outside the training vocabulary
    blocks: torch.Tensor  # [] supervised blocks
    correct: torch.Tensor  # [B] supervised slots whose argmax is the label
    accept: torch.Tensor  # [B] Σ accept over supervised slots
    tokens: torch.Tensor  # [B] supervised slots

    @classmethod
    def zeros(cls, block_size: int) -> LossSums:
        """Float64 zeros: the sum of no batch."""
        return cls.from_vector(torch.zeros(len(_SCALARS) + len(_PER_SLOT) * block_size, dtype=torch.float64))

    def objective(self, cfg: LossConfig) -> torch.Tensor:
        """α_ce ΣCE·w + α_l1 ΣL1·w + α_conf ΣBCE·w: what `train/` divides by the pooled Σw."""
        return cfg.combine(self.ce, self.l1, self.bce)

    def detach(self) -> LossSums:
        """Detached float64 copies (to add over batches and ranks without float32 rounding)."""
        return LossSums(**{f.name: getattr(self, f.name).detach().double() for f in fields(self)})

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_vector(self) -> torch.Tensor:
        """All sums as one float64 vector [10 + 3B] (one all-reduce pools them over ranks)."""
        s = self.detach()
        scalars = torch.stack([getattr(s, k) for k in _SCALARS])
        return torch.cat([scalars, *(getattr(s, k) for k in _PER_SLOT)])

    @classmethod
    def from_vector(cls, vec: torch.Tensor) -> LossSums:
        b = (vec.numel() - len(_SCALARS)) // len(_PER_SLOT)
        per_slot = vec[len(_SCALARS) :].view(len(_PER_SLOT), b)
        return cls(
            **dict(zip(_SCALARS, vec[: len(_SCALARS)], strict=True)),
            **dict(zip(_PER_SLOT, per_slot, strict=True)),
        )

    def metrics(self, cfg: LossConfig, *, per_slot: bool = False) -> dict[str, float]:
        """Every metric of these sums (module docstring); NaN where its count is 0. The per-slot
        ones (`acc_slot{j}`, `accept_slot{j}`) only with `per_slot`: the training and validation
        logs keep to the block-level numbers (evaluate reports real per-slot acceptance)."""
        s = self.detach()
        div = lambda x, d: float(x) / float(d) if float(d) > 0 else math.nan
        tokens = s.tokens.sum()
        m = {
            "ce": div(s.ce, s.weight),
            "l1": div(s.l1, s.weight),
            "conf": div(s.bce, s.weight),
            "conf_target": div(s.conf_target, s.weight),
            "conf_floor": div(s.conf_floor, s.weight),
            "acc": div(s.correct.sum(), tokens),
            "tau_probabilistic": div(s.tau, s.blocks),
            "tau_greedy": div(s.greedy, s.blocks),
            "outside_vocab": div(s.outside, tokens),
            "supervised_tokens": float(tokens),
        }
        m["loss"] = cfg.combine(m["ce"], m["l1"], m["conf"])
        m["conf_excess"] = m["conf"] - m["conf_floor"]
        m["conf_skill"] = confidence_skill(m["conf_excess"], m["conf_target"], m["conf_floor"])
        for j in range(s.tokens.numel() if per_slot else 0):
            m[f"acc_slot{j}"] = div(s.correct[j], s.tokens[j])
            m[f"accept_slot{j}"] = div(s.accept[j], s.tokens[j])
        return m
