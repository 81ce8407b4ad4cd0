"""Evaluation metrics: acceptance length, per-slot acceptance, speed; the DVC metrics/plot files.

Definitions (one round = one draft block verified by one target forward):

- ``tau`` = mean over rounds of (accepted draft tokens + 1): tokens committed per target forward.
- ``per_slot_acceptance[j]`` = among rounds that sent slot j's draft token to verification, the
  fraction in which it was accepted (i.e. the whole prefix 0..j was accepted). Without a
  confidence cut every round proposes every slot and ``tau = 1 + sum_j per_slot_acceptance[j]``,
  the quantity the training metric ``tau_probabilistic`` estimates.
- ``ms_per_token_*`` = wall time of the whole decode of all prompts / generated tokens; the
  target baseline is the plain KV-cached decode of the same prompts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dspark_offline.evaluate.speculative import RoundStats


@dataclass
class EvalTally:
    """Running totals over prompts."""

    block_size: int
    num_prompts: int = 0
    rounds: int = 0
    committed: int = 0  # sum over rounds of accepted + 1
    proposed: int = 0
    accepted: int = 0
    slot_proposed: list[int] = field(default_factory=list)  # [B]
    slot_accepted: list[int] = field(default_factory=list)  # [B]
    spec_tokens: int = 0
    spec_seconds: float = 0.0
    target_tokens: int = 0
    target_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.slot_proposed = [0] * self.block_size
        self.slot_accepted = [0] * self.block_size

    def add_prompt(
        self,
        rounds: list[RoundStats],
        spec_tokens: int,
        spec_seconds: float,
        target_tokens: int,
        target_seconds: float,
    ) -> None:
        self.num_prompts += 1
        for r in rounds:
            if not 0 <= r.accepted <= r.proposed <= self.block_size:
                raise ValueError(f"inconsistent round {r} for block size {self.block_size}")
            self.rounds += 1
            self.committed += r.accepted + 1
            self.proposed += r.proposed
            self.accepted += r.accepted
            for j in range(r.proposed):
                self.slot_proposed[j] += 1
                self.slot_accepted[j] += int(j < r.accepted)
        self.spec_tokens += spec_tokens
        self.spec_seconds += spec_seconds
        self.target_tokens += target_tokens
        self.target_seconds += target_seconds

    def per_slot(self) -> list[float | None]:
        """Acceptance rate of each slot; None for a slot never proposed."""
        return [a / p if p else None for a, p in zip(self.slot_accepted, self.slot_proposed)]

    def metrics(self) -> dict:
        spec_ms = 1000 * self.spec_seconds / self.spec_tokens if self.spec_tokens else None
        target_ms = 1000 * self.target_seconds / self.target_tokens if self.target_tokens else None
        return {
            "tau": self.committed / self.rounds if self.rounds else None,
            "num_prompts": self.num_prompts,
            "num_rounds": self.rounds,
            "draft_tokens_proposed": self.proposed,
            "draft_tokens_accepted": self.accepted,
            "draft_acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "per_slot_acceptance": {str(j): rate for j, rate in enumerate(self.per_slot())},
            "generated_tokens": self.spec_tokens,
            "ms_per_token_spec": spec_ms,
            "ms_per_token_target": target_ms,
            "speedup": target_ms / spec_ms if spec_ms and target_ms else None,
        }


def _clean(value):
    """JSON has no NaN/inf: map them to null (DVC reads the file as strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(metrics), indent=2) + "\n")
    return path


def write_per_slot(tally: EvalTally, path: str | Path) -> Path:
    """TSV for a DVC plot: slot, acceptance_rate (0 for never-proposed slots), proposed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["slot\tacceptance_rate\tproposed"]
    for j, (rate, proposed) in enumerate(zip(tally.per_slot(), tally.slot_proposed)):
        lines.append(f"{j}\t{0.0 if rate is None else rate:.6f}\t{proposed}")
    path.write_text("\n".join(lines) + "\n")
    return path
