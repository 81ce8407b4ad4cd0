"""The two DSpark heads on top of the DFlash backbone (DESIGN §4 items 6 and 8).

Module and parameter names are the serving names (SGLang `VanillaMarkov`,
`DSparkConfidenceHead`): `markov_head.markov_w1.weight [V, r]`, `markov_head.markov_w2.weight
[V, r]`, `confidence_head.proj.{weight [1, H(+r)], bias [1]}`.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark_offline.linalg import vocab_logits

HEAD_INIT_STD = 0.02


class MarkovHead(nn.Module):
    """Low-rank learned bigram bias: `bias(prev) = W2(W1[prev])`, added to the block logits.

    A DFlash block predicts its slots in parallel, so slot j cannot see what slot j−1 drafted;
    this head restores a left-to-right dependency on the previous token at negligible cost.
    """

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        nn.init.normal_(self.markov_w1.weight, std=HEAD_INIT_STD)
        nn.init.normal_(self.markov_w2.weight, std=HEAD_INIT_STD)

    def prev_embedding(self, prev_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., r]
        return self.markov_w1(prev_ids.long())

    def bias(self, prev_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[...] -> [..., V], or [..., len(rows)] for the vocabulary entries ``rows`` only."""
        weight = self.markov_w2.weight if rows is None else self.markov_w2.weight[rows]  # [V or Vs, r]
        return vocab_logits(self.prev_embedding(prev_ids), weight)


class ConfidenceHead(nn.Module):
    """Per-slot acceptance predictor: `c_j = proj([h_j ; W1[prev_j]])` (a logit).

    Trained against the (detached) probability that the target accepts slot j; at inference
    the block is cut where `sigmoid(c_j)` falls below a threshold. With the Markov head off
    the input is `h_j` alone.
    """

    def __init__(self, hidden_size: int, markov_rank: int, with_markov: bool) -> None:
        super().__init__()
        self.with_markov = with_markov
        self.proj = nn.Linear(hidden_size + (markov_rank if with_markov else 0), 1)
        nn.init.normal_(self.proj.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        hidden: torch.Tensor,  # [..., H] final-norm draft hidden
        prev_embedding: torch.Tensor | None,  # [..., r] W1[prev] (None without Markov)
    ) -> torch.Tensor:  # [...] confidence logits
        if self.with_markov:
            if prev_embedding is None:
                raise ValueError("ConfidenceHead(with_markov=True) needs the Markov prev embedding")
            hidden = torch.cat([hidden, prev_embedding.to(hidden.dtype)], dim=-1)
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)
