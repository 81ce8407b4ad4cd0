"""Numerics shared by the target side and the drafter (a leaf module: imports torch only)."""

from __future__ import annotations

import torch
from torch import nn


def vocab_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a vocabulary-sized ``weight`` [V, K]: x [..., K] -> [..., V].

    Computed as ``(weight @ x^T)^T``: the same products, summed in a different kernel (results
    agree to float rounding). On CPU the plain ``x @ weight.T`` takes a slow path when x has
    a handful of rows, as in drafting a block or verifying one (7 rows in fp32: ~4x slower), and
    it was not faster for any training shape tried (``benchmarks/vocab_matmul.py``).
    """
    flat = x.reshape(-1, x.shape[-1])  # [N, K]
    return (weight @ flat.T).T.reshape(*x.shape[:-1], weight.shape[0])


class VocabHead(nn.Linear):
    """An ``nn.Linear`` output head whose forward is `vocab_logits` (same values, faster on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = vocab_logits(x, self.weight)
        return out if self.bias is None else out + self.bias


def use_vocab_head(model: nn.Module) -> None:
    """Give a loaded HF causal LM's plain ``nn.Linear`` output head the `VocabHead` forward, in place
    (weights, names and tying unchanged; any other head type is left alone)."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = VocabHead
