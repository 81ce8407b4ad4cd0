"""What the decoding loop needs from a drafter, and the confidence early-stop rule.

The loop talks to any object with this small interface (the exported DSpark drafter through
`dspark_offline.evaluate.drafter.ServingDrafter`, the no-training prompt-lookup baseline in
`dspark_offline.evaluate.prompt_lookup`, or a test oracle), so the target-side logic is tested
independently of the model.

Slot convention (DESIGN.md §4, the "all-slots" convention SGLang/DeepSpec serve): the block is
``[x_a, MASK x (B-1)]`` at positions ``a .. a+B-1`` and slot ``j`` predicts ``x[a+j+1]``, so one
block proposes at most ``B`` draft tokens and a round commits at most ``B + 1`` tokens. A
proposal may be shorter than ``B`` (prompt lookup stops where its match's continuation ends) or
empty (the round then verifies only the last token and commits one target token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Proposal:
    """One drafted block."""

    tokens: torch.Tensor  # [n] int64, n <= B; tokens[j] = draft of x[a+j+1], sampled left to right
    probs: torch.Tensor | None  # [n, V] fp32; q_j that tokens[j] was sampled from (needed at T > 0;
    #                             a deterministic proposer gives one-hot rows)
    confidence: torch.Tensor | None  # [n] raw confidence logits (None: no confidence head)


class Drafter(Protocol):
    """A block drafter conditioned on target layer states and token ids, fed incrementally.

    The loop calls ``begin`` once per sequence with the prompt's states and ids, ``extend`` after
    every verification with the states and ids of the newly verified positions, and ``propose``
    in between, so at ``propose(position=a)`` the drafter holds the states and token ids of
    exactly positions ``0 .. a-1`` (plus ``last_token`` = x[a], passed to ``propose``). A drafter
    may cache derived context per position (DSpark's ``fc`` projection) and ignore what it does
    not read: DSpark ignores the ids, prompt lookup reads no layer (``layer_ids == []``, the
    states then have ``L = 0``).
    """

    block_size: int  # B: the most draft tokens one proposal holds
    layer_ids: list[int]  # "dspark" ids of the target layers the drafter reads ([] = none)

    def begin(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        """New sequence; states [P, L, H] and ids [P] int64 of the prompt positions 0 .. P-1."""
        ...

    def extend(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        """Append states [k, L, H] and ids [k] int64 of the next k verified positions."""
        ...

    def propose(
        self, last_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        """Draft up to ``B`` tokens after ``last_token`` = x[a], which sits at ``position`` (= a)."""
        ...


def confident_prefix(confidence: torch.Tensor | None, threshold: float | None) -> int | None:
    """How many leading draft tokens survive the confidence early stop (None = all).

    Rule: the confidence logit of slot j is the head's estimate that draft token j is accepted
    given tokens 0..j-1 were (it reads the slot's hidden state and the Markov embedding of the
    token before it, as in SGLang's ``compute_confidence``). Draft token j is kept iff
    ``sigmoid(c_i) >= threshold`` for every i <= j: the block is cut at the first slot whose
    confidence is below the threshold, and that slot's token and all later ones are not
    verified. A cut at slot 0 leaves an empty draft; the round then verifies only the last token
    and commits one target token. (SGLang serves the same per-slot confidences through a
    throughput-driven verify budget instead of a fixed threshold; DeepSpec's evaluator exposes a
    threshold. With threshold 0 or None nothing is cut.)
    """
    if threshold is None or threshold <= 0 or confidence is None:
        return None
    keep = torch.sigmoid(confidence.float()) >= threshold  # [B] bool
    return int(keep.long().cumprod(dim=0).sum().item())
