"""The speculative decoding loop: draft a block, verify it in one target forward, commit.

Per round, with ``a`` = position of the last committed token ``x_a`` (not yet seen by the target):

1. the drafter gets the target layer states and token ids of positions ``0 .. a-1`` (kept
   incrementally: each round appends those of the tokens it verified) and drafts up to ``B``
   tokens ``d_0 ..`` (a proposer without a match drafts none);
2. the confidence rule may cut the draft to ``d_0 .. d_{n-1}`` (n <= the number drafted);
3. ONE target forward over ``[x_a, d_0 .. d_{n-1}]`` at positions ``a .. a+n`` with the KV cache
   gives ``n + 1`` next-token distributions and the layer states of those positions;
4. greedy (T = 0) or rejection-sampling (T > 0) verification accepts ``k`` tokens and yields the
   next target token; the KV cache is cropped to ``a + k + 1`` (drops the rejected suffix) and the
   states of positions ``a .. a+k`` join the context.

The round commits ``k + 1`` tokens; that is its acceptance length. Generation stops after a stop
token or at ``max_new_tokens`` (the last round's commit is truncated there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dspark_offline.evaluate.proposal import Drafter, confident_prefix
from dspark_offline.evaluate.target import TargetSession
from dspark_offline.evaluate.verify import logits_to_probs, verify_greedy, verify_rejection


@dataclass
class RoundStats:
    proposed: int  # draft tokens sent to verification (after the confidence cut)
    accepted: int  # of those, accepted by the target


@dataclass
class SpecResult:
    tokens: list[int]  # generated tokens (stop token included), at most max_new_tokens
    rounds: list[RoundStats] = field(default_factory=list)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """First token after the prompt, straight from the prefill: logits [V]."""
    if temperature > 0:
        return int(torch.multinomial(logits_to_probs(logits, temperature).cpu(), 1, generator=generator))
    return int(logits.argmax())


def _finish(tokens: list[int], max_new_tokens: int, stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Truncate after the first stop token / at the budget; report whether generation is over."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: min(i + 1, max_new_tokens)], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.inference_mode()
def speculative_decode(
    model: nn.Module,
    drafter: Drafter,
    prompt: torch.Tensor,  # [P] int64
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    temperature: float = 0.0,
    confidence_threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> SpecResult:
    """Decode after ``prompt`` [P] with speculation; see the module docstring for one round."""
    session = TargetSession(model, drafter.layer_ids)
    logits, states = session.forward(prompt, last_logits_only=True)  # [1, V], [P, L, H]
    drafter.begin(states, prompt)
    tokens, done = _finish([_pick(logits[-1], temperature, generator)], max_new_tokens, stop_ids)
    result = SpecResult(tokens)
    while not done:
        a = session.length  # position of the last committed token, tokens[-1]
        proposal = drafter.propose(tokens[-1], a, temperature, generator)
        if proposal.tokens.numel() > drafter.block_size:
            raise ValueError(
                f"{type(drafter).__name__} proposed {proposal.tokens.numel()} tokens, more than its "
                f"block size {drafter.block_size}"
            )
        n = confident_prefix(proposal.confidence, confidence_threshold)
        draft = proposal.tokens[:n].long().cpu()  # [n]
        window = torch.cat([torch.tensor([tokens[-1]]), draft])  # [n+1]
        logits, states = session.forward(window)  # [n+1, V], [n+1, L, H]
        if temperature > 0:
            if proposal.probs is None:
                raise ValueError("temperature > 0 needs the draft distributions (Proposal.probs), got None")
            verdict = verify_rejection(
                draft, proposal.probs[: len(draft)], logits_to_probs(logits, temperature), generator
            )
        else:
            verdict = verify_greedy(draft, logits)
        k = verdict.num_accepted
        session.crop(a + k + 1)
        drafter.extend(states[: k + 1], window[: k + 1])  # positions a .. a+k are now verified
        result.rounds.append(RoundStats(proposed=len(draft), accepted=k))
        tokens, done = _finish(tokens + draft[:k].tolist() + [verdict.next_token], max_new_tokens, stop_ids)
    result.tokens = tokens
    return result
