"""The L1 distance between the draft and the target distribution of a slot (DESIGN §4 item 7).

`accept_j = clamp(1 − L1_j/2, 0, 1)` is the min(q, p) overlap, i.e. the probability that
rejection sampling accepts slot j given slots < j were accepted: the confidence head's target
and the factor of `tau_probabilistic`.

The store holds only the target's top-k (and optionally its final hidden state), so the L1 is
estimated; `l1_mode` picks how (measured in `benchmarks/topk_l1.py`):
- `topk`: Σ_K|q−p| + |Q_rest − r|, a lower bound of the exact L1 (the tail compared as one
  bin), so accept_j and tau are optimistic.
- `capped`: the tightest lower bound the top-k alone allows (every tail probability is at most
  the smallest stored one); never below `topk`, never above the exact L1.
- `recompute`: the target distribution on the draft's vocabulary recomputed from
  `final_hidden` (one more [Vs] logits matmul, no pass over the whole vocabulary), exact up to
  the rounding of the stored probabilities and of `final_hidden`.
- `exact`: the full softmax of `final_hidden` over the whole vocabulary.

With a training vocabulary (`DSparkDraft.set_train_vocab`) q lives on its Vs entries (0
elsewhere), so every mode counts the target mass that lies outside as distance.
"""

from __future__ import annotations

import math

import torch

from dspark_offline.config import FINAL_HIDDEN_L1_MODES
from dspark_offline.linalg import vocab_logits

L1_MODES = ("topk", "capped", "recompute", "exact")


def needs_final_hidden(l1_mode: str) -> bool:
    """Whether an `l1_mode` reads the target's final hidden state (`final_hidden`)."""
    return l1_mode in FINAL_HIDDEN_L1_MODES


def acceptance(l1: torch.Tensor) -> torch.Tensor:
    """Probability that the target accepts a drafted slot, `clamp(1 − L1/2, 0, 1)`."""
    return (1.0 - 0.5 * l1).clamp(0.0, 1.0)


def in_vocab(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of vocabulary ids in the draft distribution q, and whether q has them at all:
    ids themselves with the full vocabulary, else their index in the training vocabulary."""
    if model.train_vocab is None:
        return ids.long(), torch.ones_like(ids, dtype=torch.bool)
    pos = model.train_vocab_index[ids.long()]
    return pos.clamp(min=0), pos >= 0


def l1_to_target(
    model,
    q: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_probs: torch.Tensor,
    final_hidden: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """L1 [n, B] between the draft distribution q [n, B, V or Vs] and the target's, by `mode`.

    `model` (a DSparkDraft) gives the frozen target head and the training vocabulary;
    topk_ids / topk_probs [n, B, K] are the stored top-k, final_hidden [n, B, H] the stored final
    hidden state (None unless `needs_final_hidden(mode)`)."""
    if mode in ("topk", "capped"):
        pos, inside = in_vocab(model, topk_ids)
        qk = q.gather(-1, pos) * inside  # [n, B, K]
        return topk_l1(qk, topk_probs) if mode == "topk" else capped_topk_l1(q, qk, topk_probs)
    if mode == "recompute":
        return _recomputed_l1(model, q, topk_ids, topk_probs, final_hidden)
    with torch.no_grad():  # the target distribution is a constant of the objective
        head = model.lm_head_weight
        p = torch.softmax(vocab_logits(final_hidden.to(head.dtype), head).float(), dim=-1)  # [n, B, V]
    if model.train_vocab is None:
        return (q - p).abs().sum(-1)
    p_in = p[..., model.train_vocab]  # [n, B, Vs]
    return (q - p_in).abs().sum(-1) + (1.0 - p_in.sum(-1)).clamp(min=0.0)


def topk_l1(qk: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
    """Σ_K|q−p| + |Q_rest − r| from q at the top-k ids (qk [n, B, K]): a lower bound of Σ_V|q−p|
    (the rest mass compared as one bin)."""
    rest_q = 1.0 - qk.sum(-1)
    rest_p = 1.0 - topk_probs.sum(-1)
    return (qk - topk_probs).abs().sum(-1) + (rest_q - rest_p).abs()


def capped_topk_l1(q: torch.Tensor, qk: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
    """The tightest lower bound of Σ_V|q−p| that the top-k alone gives (q [n, B, V or Vs], qk
    [n, B, K] = q at the top-k ids, 0 where q lacks them).

    Outside the top-k, Σ|q−p| = Q_rest + r − 2·Σ_tail min(q_i, p_i), and every tail p_i is at most
    p_(k), the smallest stored probability, so the tail overlap is at most
    min(r, Σ_tail min(q_i, p_(k))) (the second term is itself at most Q_rest). `topk_l1` assumes
    the overlap min(Q_rest, r), so this is never below it; the overlap bound is reached when p puts
    its tail where q is, so no bound from the top-k alone is tighter. The exact L1 is at most
    Σ_K|q−p| + Q_rest + r (no tail overlap).
    """
    rest_q = (1.0 - qk.sum(-1)).clamp(min=0.0)  # [n, B]
    rest_p = (1.0 - topk_probs.sum(-1)).clamp(min=0.0)
    cap = topk_probs.amin(-1, keepdim=True)  # [n, B, 1] p_(k) >= every tail probability
    tail_cap = (torch.minimum(q, cap).sum(-1) - torch.minimum(qk, cap).sum(-1)).clamp(min=0.0)  # [n, B]
    overlap = torch.minimum(rest_p, tail_cap)
    return (qk - topk_probs).abs().sum(-1) + rest_q + rest_p - 2.0 * overlap


def _recomputed_l1(model, q, topk_ids, topk_probs, final_hidden) -> torch.Tensor:
    """Σ_Vs|q − p| + (1 − Σ_Vs p) [n, B] with the target distribution p on the draft's vocabulary
    Vs (the training vocabulary, or all of V) recomputed from the final hidden state: the stored
    probability for a stored id, exp(z_i − lse) for the others (`_fitted_target`). Exact up to
    the rounding of the stored probabilities (fp16) and of final_hidden (bf16 by default)."""
    pos, inside = in_vocab(model, topk_ids)  # [n, B, K] positions in q, and whether q has them
    with torch.no_grad():  # the target distribution is a constant of the objective
        p = _fitted_target(model, topk_ids, topk_probs, final_hidden, pos, inside)  # [n, B, V or Vs]
    return l1_with_stored_topk(q, p, pos, inside, topk_probs)


def _fitted_target(model, topk_ids, topk_probs, final_hidden, pos, inside) -> torch.Tensor:
    """exp(z − lse) [n, B, V or Vs], z = final_hidden · lm_head[vocabulary]ᵀ, without a pass over
    the whole vocabulary.

    lse (the log-normaliser over all of V) is fitted so that the recomputed mass of the stored ids
    equals their stored mass: lse = log Σ e^z_K − log Σ p_K over the stored ids inside the
    vocabulary and the stored top-1 (its logit comes from its own lm_head row, so every slot has
    an id to fit on even when no stored id is in the vocabulary). The fit averages the rounding of
    the stored probabilities over the top-k mass instead of trusting one of them.
    """
    vocab = model.train_vocab
    head = model.lm_head_weight if vocab is None else model.lm_head_weight[vocab]  # [V or Vs, H]
    h = final_hidden.to(head.dtype)  # [n, B, H]
    z = vocab_logits(h, head).float()  # [n, B, V or Vs]
    zk = z.gather(-1, pos)  # [n, B, K]
    zk[..., 0] = (
        (h * model.lm_head_weight[topk_ids[..., 0].long()]).sum(-1).float()
    )  # the top-1, inside or not
    use = inside.clone()
    use[..., 0] = True
    lse = torch.logsumexp(zk.masked_fill(~use, -math.inf), -1) - torch.log(
        (topk_probs * use).sum(-1)
    )  # [n, B]
    return z.sub_(lse[..., None]).exp_()


def l1_with_stored_topk(q, p, pos, inside, topk_probs) -> torch.Tensor:
    """Σ|q − p'| + max(0, 1 − Σp') [n, B], where p' is p [n, B, V or Vs] with the stored
    probabilities put in at the stored ids q has (`pos`, `inside` [n, B, K]); written as a
    correction at those K entries, so p is never copied or scattered into."""
    qk, pk = q.gather(-1, pos), p.gather(-1, pos)  # [n, B, K]
    fix = ((qk - topk_probs).abs() - (qk - pk).abs()) * inside  # [n, B, K]
    mass = p.sum(-1) + ((topk_probs - pk) * inside).sum(-1)  # [n, B] Σ p'
    return (q - p).abs().sum(-1) + fix.sum(-1) + (1.0 - mass).clamp(min=0.0)
