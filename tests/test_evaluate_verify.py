"""Acceptance rules (pure): greedy counting, the rejection-sampling formula, the confidence cut."""

from __future__ import annotations

import pytest
import torch

from dspark_offline.evaluate.proposal import confident_prefix
from dspark_offline.evaluate.verify import (
    logits_to_probs,
    residual_distribution,
    verify_greedy,
    verify_rejection,
)


def _logits_with_argmax(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.randn(len(argmaxes), vocab) * 0.1
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits  # [n+1, V]


@pytest.mark.parametrize(
    "draft, target, accepted, nxt",
    [
        ([3, 4, 5], [3, 4, 5, 6], 3, 6),  # all accepted -> bonus from the last row
        ([3, 4, 5], [3, 9, 5, 6], 1, 9),  # mismatch at slot 1 -> target's token there
        ([3, 4, 5], [7, 4, 5, 6], 0, 7),  # first slot wrong; later matches do not count
        ([], [2], 0, 2),  # empty draft = a plain target step
    ],
)
def test_verify_greedy_counts_leading_matches(draft, target, accepted, nxt):
    v = verify_greedy(torch.tensor(draft, dtype=torch.long), _logits_with_argmax(target))
    assert (v.num_accepted, v.next_token) == (accepted, nxt)


def test_verify_greedy_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="rows"):
        verify_greedy(torch.tensor([1, 2]), torch.zeros(2, 5))


def _first_token_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact law of the first committed token: accept x with q(x)·min(1, p/q), else resample."""
    accept = q * torch.clamp(p / q.clamp_min(1e-30), max=1.0)  # [V]
    return accept + (1 - accept.sum()) * residual_distribution(p, q)


@pytest.mark.parametrize("seed", range(5))
def test_rejection_formula_preserves_target_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=g) * 2, 0)
    q = torch.softmax(torch.randn(6, generator=g) * 2, 0)
    torch.testing.assert_close(_first_token_law(p, q), p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("token", range(4))
def test_rejection_formula_with_a_deterministic_draft(token):
    """Prompt lookup's q is one-hot: accept its token with probability p(token), else resample
    from p without it; the committed token is still distributed as p."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.nn.functional.one_hot(torch.tensor(token), 4).float()
    torch.testing.assert_close(_first_token_law(p, q), p)
    residual = residual_distribution(p, q)
    assert residual[token] == 0 and torch.allclose(residual.sum(), torch.tensor(1.0))


def test_verify_rejection_with_a_one_hot_draft_is_distributed_like_the_target():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.0, 1.0, 0.0]])  # always proposes token 1
    counts, accepted, n = torch.zeros(3), 0, 6000
    for _ in range(n):
        v = verify_rejection(torch.tensor([1]), q, p, g)
        first = 1 if v.num_accepted else v.next_token
        counts[first] += 1
        accepted += v.num_accepted
    torch.testing.assert_close(counts / n, p[0], atol=0.025, rtol=0)
    assert abs(accepted / n - 0.6) < 0.025  # acceptance probability = p(proposed token)


def test_rejection_formula_with_disjoint_support():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.3, 0.7])
    torch.testing.assert_close(_first_token_law(p, q), p)


def test_residual_distribution_when_draft_equals_target():
    p = torch.tensor([0.2, 0.8])
    assert torch.equal(residual_distribution(p, p.clone()), p)


def test_verify_rejection_is_distributed_like_the_target():
    """Monte Carlo through the real function on a 5-token vocabulary, two draft slots.

    Slot 1's target/draft distributions depend on the slot-0 token (as in a real block), so the
    joint law of the first two committed tokens must be p0(x) p1(y | x). When slot 0 is rejected
    the second token would come from the next round; we check the first token's marginal on all
    trials and the second token's conditional law on the trials that committed it in this round
    after an accepted first token, which must still follow p1 (rejection sampling is exact
    conditionally on the prefix).
    """
    g = torch.Generator().manual_seed(0)
    V, N = 5, 10000
    p0 = torch.softmax(torch.randn(V, generator=g), 0)
    q0 = torch.softmax(torch.randn(V, generator=g), 0)
    p1 = torch.softmax(torch.randn(V, V, generator=g), -1)  # [x, V]
    q1 = torch.softmax(torch.randn(V, V, generator=g), -1)
    p2 = torch.full((V,), 1.0 / V)
    first = torch.zeros(V)
    second = torch.zeros(V, V)
    for _ in range(N):
        d0 = int(torch.multinomial(q0, 1, generator=g))
        d1 = int(torch.multinomial(q1[d0], 1, generator=g))
        v = verify_rejection(
            torch.tensor([d0, d1]), torch.stack([q0, q1[d0]]), torch.stack([p0, p1[d0], p2]), g
        )
        committed = [d0, d1][: v.num_accepted] + [v.next_token]
        first[committed[0]] += 1
        if v.num_accepted >= 1:
            second[committed[0], committed[1]] += 1
    torch.testing.assert_close(first / N, p0, atol=0.02, rtol=0)  # ~4 sigma at N=10k
    for x in range(V):
        n_x = second[x].sum()
        if n_x > 1200:
            torch.testing.assert_close(second[x] / n_x, p1[x], atol=0.06, rtol=0)


def test_verify_rejection_identical_distributions_accepts_everything():
    p = torch.softmax(torch.randn(3, 7), -1)
    for seed in range(20):
        v = verify_rejection(torch.tensor([1, 2]), p[:2], p, torch.Generator().manual_seed(seed))
        assert v.num_accepted == 2


def test_verify_rejection_errors_name_the_problem():
    with pytest.raises(ValueError, match="shape mismatch"):
        verify_rejection(torch.tensor([1]), torch.ones(2, 4) / 4, torch.ones(2, 4) / 4)
    q = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="draft probability 0"):
        verify_rejection(torch.tensor([1]), q, torch.ones(2, 2) / 2)


def test_logits_to_probs_temperature():
    logits = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(logits_to_probs(logits, 0.5), torch.softmax(logits * 2, 0))
    with pytest.raises(ValueError):
        logits_to_probs(logits, 0.0)


def test_confident_prefix_cuts_at_first_low_slot():
    conf = torch.logit(torch.tensor([0.9, 0.8, 0.3, 0.95]))  # raw logits
    assert confident_prefix(conf, 0.5) == 2  # slot 2 below -> keep tokens 0, 1; slot 3 dropped too
    assert confident_prefix(conf, 0.95) == 0
    assert confident_prefix(conf, 0.2) == 4
    assert confident_prefix(conf, None) is None
    assert confident_prefix(conf, 0.0) is None
    assert confident_prefix(None, 0.5) is None
