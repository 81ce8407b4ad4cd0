"""95 % bootstrap intervals of acceptance lengths over prompts (pure numpy).

τ is a ratio of sums, committed tokens / verification rounds over all prompts, so a resample
draws prompts with replacement and recomputes that ratio (not a mean of per-prompt τ, which
would weigh a 3-round prompt like a 60-round one). A comparison of two decoders is **paired**:
both τ of one resample come from the same drawn prompts, so prompt difficulty, shared by both,
cancels in their ratio. The interval is the percentile interval of the resampled statistic.

The resampled prompt sets depend only on (number of prompts, resamples, seed), so every interval
of one evaluation is computed on the same sets. A resample whose drawn prompts have no round at
all (each stopped at its first token) has no τ and is left out.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def resample_indices(num_prompts: int, resamples: int, seed: int) -> np.ndarray:
    """[R, N] prompt indices drawn with replacement (row r = the prompts of resample r)."""
    if num_prompts < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs >= 1 prompt and >= 1 resample, got {num_prompts} and {resamples}")
    return np.random.default_rng(seed).integers(0, num_prompts, size=(resamples, num_prompts))


def _tau_samples(committed: np.ndarray, rounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-prompt committed [N], rounds [N], indices [R, N] -> τ of each resample [R] (nan: no round)."""
    num = committed[idx].sum(axis=1)  # [R]
    den = rounds[idx].sum(axis=1)  # [R]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float] | None:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def _arrays(committed, rounds) -> tuple[np.ndarray, np.ndarray]:
    c, r = np.asarray(committed, dtype=np.float64), np.asarray(rounds, dtype=np.float64)  # exact for counts
    if c.shape != r.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(
            f"committed and rounds must be equal-length 1-d per-prompt counts, got {c.shape}, {r.shape}"
        )
    return c, r


def tau_interval(
    committed, rounds, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float] | None:
    """Bootstrap interval of τ = Σ committed / Σ rounds from per-prompt counts [N]; None: no round."""
    c, r = _arrays(committed, rounds)
    return _percentiles(_tau_samples(c, r, resample_indices(c.size, resamples, seed)), level)


def tau_ratio_interval(
    committed_a,
    rounds_a,
    committed_b,
    rounds_b,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """Paired bootstrap interval of τ_a / τ_b; decoders a and b decoded the same N prompts."""
    ca, ra = _arrays(committed_a, rounds_a)
    cb, rb = _arrays(committed_b, rounds_b)
    if ca.size != cb.size:
        raise ValueError(f"a paired ratio needs the same prompts: {ca.size} vs {cb.size} per-prompt counts")
    idx = resample_indices(ca.size, resamples, seed)
    return _percentiles(_tau_samples(ca, ra, idx) / _tau_samples(cb, rb, idx), level)
