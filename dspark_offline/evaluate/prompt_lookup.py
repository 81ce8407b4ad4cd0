"""Prompt-lookup decoding (PLD): the no-training baseline every drafter is shown beside.

Rule (DESIGN.md §5): with ``x_0 .. x_a`` the prompt plus the tokens committed so far, find the
**latest earlier** occurrence of the last ``n`` tokens ``x_{a-n+1} .. x_a``, trying n = 3, then
2, then 1; "earlier" means the occurrence ends before position ``a`` (it may overlap the tail).
Propose the tokens that followed it, at most ``B`` of them, fewer where they run into ``x_a``;
without any match propose nothing (the round then commits one target token).

The proposal goes through the same verification loop as a trained drafter. It is deterministic,
so its draft distribution is one-hot: at T > 0 rejection sampling accepts a proposed token ``d``
with probability ``p(d)`` and otherwise resamples from ``p`` without ``d``, which keeps the
output distributed exactly as the target's. PLD reads no target layer (``layer_ids == []``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dspark_offline.evaluate.proposal import Proposal

MAX_NGRAM = 3


def lookup_continuation(history: Sequence[int], max_tokens: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """history = x_0 .. x_a -> the continuation of the latest earlier match of its last n tokens.

    Tries n = max_ngram .. 1 (longest first); returns at most ``max_tokens`` tokens, [] when no
    n-gram matches. A match ending at ``e < a`` yields ``history[e+1 : e+1+max_tokens]``, which
    is never empty (it holds at least ``x_a``).
    """
    if max_tokens < 1:
        return []
    last = len(history) - 1
    for n in range(min(max_ngram, last), 0, -1):
        tail = list(history[last - n + 1 :])  # [n]
        end_token = tail[-1]
        for e in range(last - 1, n - 2, -1):  # candidate match ends, latest first
            if history[e] == end_token and list(history[e - n + 1 : e + 1]) == tail:
                return list(history[e + 1 : e + 1 + max_tokens])
    return []


class PromptLookupDrafter:
    """`Drafter` (see `proposal.py`) proposing by prompt lookup; keeps the committed token ids."""

    block_size: int  # B: the most tokens one proposal holds
    layer_ids: list[int]  # always []: PLD reads no target layer

    def __init__(self, block_size: int, vocab_size: int, max_ngram: int = MAX_NGRAM):
        if block_size < 1 or vocab_size < 1 or max_ngram < 1:
            raise ValueError(
                f"prompt lookup needs block_size, vocab_size and max_ngram >= 1, got "
                f"{block_size}, {vocab_size}, {max_ngram}"
            )
        self.block_size, self.vocab_size, self.max_ngram = block_size, vocab_size, max_ngram
        self.layer_ids = []
        self._ids: list[int] = []  # token ids of positions 0 .. a-1

    def begin(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        self._ids = [int(t) for t in ids.tolist()]

    def extend(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        self._ids.extend(int(t) for t in ids.tolist())

    def propose(
        self, last_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        if len(self._ids) != position:
            raise RuntimeError(
                f"prompt lookup holds {len(self._ids)} token ids, the block starts at {position}"
            )
        draft = lookup_continuation(self._ids + [int(last_token)], self.block_size, self.max_ngram)
        tokens = torch.tensor(draft, dtype=torch.int64)  # [n], n <= B
        probs = None
        if temperature > 0:  # deterministic proposal: q_j is the one-hot of d_j
            probs = torch.zeros(len(draft), self.vocab_size)  # [n, V]
            probs[torch.arange(len(draft)), tokens] = 1.0
        return Proposal(tokens=tokens, probs=probs, confidence=None)
