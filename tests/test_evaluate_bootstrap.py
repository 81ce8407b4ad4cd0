"""Bootstrap intervals of τ over prompts (pure): coverage of the point, width, pairing, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from dspark_offline.evaluate.bootstrap import resample_indices, tau_interval, tau_ratio_interval


def _prompts(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (committed, rounds) of a decoder with a per-prompt τ between 1 and ~2.5."""
    rng = np.random.default_rng(seed)
    rounds = rng.integers(10, 60, size=n)
    committed = rounds + rng.binomial(rounds * 3, rng.uniform(0.05, 0.5, size=n))
    return committed, rounds


def test_interval_covers_the_ratio_of_sums():
    committed, rounds = _prompts(32)
    lo, hi = tau_interval(committed, rounds)
    tau = committed.sum() / rounds.sum()
    assert lo < tau < hi
    # the interval is over the ratio of sums, not the mean of per-prompt ratios
    assert (lo, hi) != pytest.approx(tau_interval(committed / rounds, np.ones(32)))


def test_interval_shrinks_with_more_prompts():
    committed, rounds = _prompts(64)
    widths = []
    for n in (8, 64):
        lo, hi = tau_interval(committed[:n], rounds[:n])
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]
    # the same prompts four times over: about half the width (1/sqrt(4))
    lo, hi = tau_interval(np.tile(committed[:16], 4), np.tile(rounds[:16], 4))
    lo16, hi16 = tau_interval(committed[:16], rounds[:16])
    assert 0.35 < (hi - lo) / (hi16 - lo16) < 0.65


def test_constant_per_prompt_tau_gives_a_zero_width_interval():
    rounds = np.array([3, 17, 40, 8, 1])
    assert tau_interval(2 * rounds, rounds) == (2.0, 2.0)
    assert tau_interval([5], [2]) == (2.5, 2.5)  # one prompt: every resample is that prompt


def test_seeded_and_reproducible():
    committed, rounds = _prompts(20)
    assert tau_interval(committed, rounds, seed=3) == tau_interval(committed, rounds, seed=3)
    assert tau_interval(committed, rounds, seed=3) != tau_interval(committed, rounds, seed=4)
    assert np.array_equal(resample_indices(5, 7, 1), resample_indices(5, 7, 1))
    assert resample_indices(5, 7, 1).shape == (7, 5)


def test_ratio_is_paired_by_prompt():
    """Two decoders that differ by a constant factor on every prompt: paired, the ratio's interval
    has zero width however much the prompts vary; unpaired it would not."""
    committed, rounds = _prompts(32)
    assert tau_ratio_interval(committed, rounds, committed, rounds) == (1.0, 1.0)
    doubled_rounds = 2 * rounds  # same commits over twice the rounds: τ_b = τ_a / 2 per prompt
    lo, hi = tau_ratio_interval(committed, rounds, committed, doubled_rounds)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # an independent decoder's ratio has a real width and covers its point estimate
    other_c, other_r = _prompts(32, seed=1)
    lo, hi = tau_ratio_interval(committed, rounds, other_c, other_r)
    point = (committed.sum() / rounds.sum()) / (other_c.sum() / other_r.sum())
    assert lo < point < hi and hi - lo > 0.01


def test_edge_cases():
    assert tau_interval([0, 0], [0, 0]) is None  # no round anywhere: no τ
    lo, hi = tau_interval([0, 6, 9], [0, 3, 3])  # a prompt without rounds only adds nothing
    assert 2.0 <= lo <= hi <= 3.0
    with pytest.raises(ValueError, match="same prompts"):
        tau_ratio_interval([2, 3], [1, 1], [2], [1])
    with pytest.raises(ValueError, match="equal-length"):
        tau_interval([2, 3], [1])
    with pytest.raises(ValueError, match="equal-length"):
        tau_interval([], [])
