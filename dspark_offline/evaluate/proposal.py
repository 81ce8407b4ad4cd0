"""What the decoding loop needs from a drafter, and the confidence early-stop rule.

The loop talks to any object with this small interface (the exported DSpark drafter through
`dspark_offline.evaluate.drafter.ServingDrafter`, or a test oracle), so the target-side logic is
tested independently of the model.

Slot convention (DESIGN.md §4, the "all-slots" convention SGLang/DeepSpec serve): the block is
``[x_a, MASK x (B-1)]`` at positions ``a .. a+B-1`` and slot ``j`` predicts ``x[a+j+1]``, so one
block proposes ``B`` draft tokens and a round commits at most ``B + 1`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Proposal:
    """One drafted block."""

    tokens: torch.Tensor  # [B] int64; tokens[j] = draft of x[a+j+1], sampled left to right
    probs: torch.Tensor | None  # [B, V] fp32; q_j that tokens[j] was sampled from (needed at T > 0)
    confidence: torch.Tensor | None  # [B] raw confidence logits (None: no confidence head)


class Drafter(Protocol):
    """A block drafter conditioned on target layer states, fed incrementally.

    The loop calls ``begin`` once per sequence with the prompt's states, ``extend`` after every
    verification with the states of the newly verified positions, and ``propose`` in between, so
    at ``propose(position=a)`` the drafter holds the states of exactly positions ``0 .. a-1``
    (a drafter may cache derived context, e.g. DSpark's ``fc`` projection, per position).
    """

    block_size: int
    layer_ids: list[int]  # "dspark" ids of the target layers the drafter reads

    def begin(self, states: torch.Tensor) -> None:
        """New sequence; states [P, L, H] of the prompt positions 0 .. P-1."""
        ...

    def extend(self, states: torch.Tensor) -> None:
        """Append states [k, L, H] of the next k verified positions."""
        ...

    def propose(
        self, last_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        """Draft the block ``[last_token, MASK ...]`` whose first slot sits at ``position`` (= a)."""
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
