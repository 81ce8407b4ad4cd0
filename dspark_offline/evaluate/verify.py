"""Target-side acceptance rules of speculative decoding (pure functions, no model).

Both rules take the target's output over the verification window ``[last token, d_0 .. d_{n-1}]``:
row ``i`` of the target logits is the target's next-token distribution after ``d_{i-1}`` (row 0:
after the last accepted token), so row ``i`` judges draft token ``d_i`` and row ``n`` gives the
bonus token when every draft token is accepted.

- **Greedy (T = 0):** accept while ``d_i == argmax(target row i)``; the next token is the target
  argmax of the first rejected row (or of row ``n``). The committed tokens are then exactly the
  target's own greedy continuation, which is what makes speculation lossless.
- **Rejection sampling (T > 0)** (Leviathan et al. 2023; Chen et al. 2023): accept ``d_i`` with
  probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection sample from
  ``norm(max(0, p_i - q_i))``; if all are accepted sample the bonus from ``p_n``. Every committed
  token is then distributed exactly as a sample from the target at temperature T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one draft block."""

    num_accepted: int  # leading draft tokens accepted, 0..n
    next_token: int  # the target's token after them (correction at a rejection, bonus otherwise)


def logits_to_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at ``temperature`` in fp32. logits [..., V] -> probs [..., V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for a distribution, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Greedy verification. draft_tokens [n] int, target_logits [n+1, V]."""
    n = draft_tokens.numel()
    if target_logits.shape[0] != n + 1:
        raise ValueError(f"target_logits has {target_logits.shape[0]} rows, expected n+1 = {n + 1}")
    target_argmax = target_logits.argmax(dim=-1)  # [n+1]
    matches = (draft_tokens.to(target_argmax.device) == target_argmax[:n]).long()  # [n]
    num_accepted = int(matches.cumprod(dim=0).sum().item()) if n else 0
    return Verdict(num_accepted, int(target_argmax[num_accepted].item()))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))`` [V]: the distribution to resample from after a rejection.

    A rejection has probability ``sum(max(0, p - q)) > 0`` unless p == q, in which case it cannot
    happen; we then return p (any choice is fine, it is never used with non-zero probability).
    """
    residual = (p - q).clamp_min(0)  # [V]
    total = residual.sum()
    if total <= 0:
        return p
    return residual / total


def verify_rejection(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Speculative rejection sampling.

    draft_tokens [n] int (d_i was sampled from draft_probs[i]), draft_probs [n, V] (q_i),
    target_probs [n+1, V] (p_i, at the same temperature). Randomness comes only from
    ``generator`` (CPU), so a seeded evaluation is reproducible.
    """
    n = draft_tokens.numel()
    if target_probs.shape[0] != n + 1 or draft_probs.shape[0] != n:
        raise ValueError(
            f"shape mismatch: {n} draft tokens, draft_probs {tuple(draft_probs.shape)}, "
            f"target_probs {tuple(target_probs.shape)} (expected [n, V] and [n+1, V])"
        )
    if n and draft_probs.shape[-1] != target_probs.shape[-1]:
        raise ValueError(f"draft vocab {draft_probs.shape[-1]} != target vocab {target_probs.shape[-1]}")
    p = target_probs.float().cpu()
    q = draft_probs.float().cpu()
    tokens = draft_tokens.long().cpu()
    for i in range(n):
        token = int(tokens[i])
        q_tok = float(q[i, token])
        if q_tok <= 0:
            raise ValueError(
                f"draft token {token} at slot {i} has draft probability 0: it cannot have been sampled"
            )
        accept_prob = min(1.0, float(p[i, token]) / q_tok)
        u = float(torch.rand((), generator=generator))
        if u >= accept_prob:
            resample = residual_distribution(p[i], q[i])
            return Verdict(i, int(torch.multinomial(resample, 1, generator=generator)))
    return Verdict(n, int(torch.multinomial(p[n], 1, generator=generator)))
