"""The plan: parts by index modulo, whole samples per shard, deterministic, small gaps."""

import numpy as np
import pytest

from dspark_offline.store.plan import effective_sizes, plan_part


def _check(plan, lengths, shard_tokens):
    seen = []
    for s in plan.shards:
        assert s.start == s.index * shard_tokens
        assert s.stop - s.start <= shard_tokens
        rows = range(s.row_start, s.row_stop)
        assert len(rows) > 0
        for r in rows:
            a, n = plan.sample_start[r], plan.sample_length[r]
            assert s.start <= a and a + n <= s.stop, "sample straddles a shard boundary"
            assert n == lengths[plan.source_index[r]]
        seen += [plan.source_index[r] for r in rows]
        # longest first inside a shard (batching relies on it)
        assert list(plan.sample_length[list(rows)]) == sorted(plan.sample_length[list(rows)], reverse=True)
    # no overlaps on the token axis
    order = np.argsort(plan.sample_start)
    ends = plan.sample_start[order] + plan.sample_length[order]
    assert (plan.sample_start[order][1:] >= ends[:-1]).all()
    return seen


@pytest.mark.parametrize("num_parts", [1, 3])
def test_plan_covers_each_sample_once_without_straddling(num_parts):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=200)
    seen = []
    for p in range(num_parts):
        plan = plan_part(lengths, num_parts, p, shard_tokens=128)
        got = _check(plan, lengths, 128)
        assert all(i % num_parts == p for i in got)
        seen += got
    assert sorted(seen) == list(range(200))


def test_plan_is_deterministic_and_packs_tightly():
    lengths = np.random.default_rng(1).integers(1, 64, size=500)
    a, b = plan_part(lengths, 1, 0, 256), plan_part(lengths, 1, 0, 256)
    assert np.array_equal(a.source_index, b.source_index) and a.shards == b.shards
    used = lengths.sum() / a.num_positions
    assert used > 0.95, f"gaps take {1 - used:.1%} of the token axis"


def test_empty_part_and_bad_lengths():
    plan = plan_part(np.array([5, 6]), 3, 2, 16)
    assert plan.num_samples == 0 and plan.num_positions == 0 and plan.shards == ()
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        plan_part(np.array([3, 0]), 1, 0, 16)
    with pytest.raises(ValueError, match="part_index=2"):
        plan_part(np.array([3]), 2, 2, 16)


def test_effective_sizes():
    assert effective_sizes(16384, 256, 1024) == (16384, 256)
    assert effective_sizes(100, 256, 1000) == (1024, 256)  # raised to the longest, whole chunks
    assert effective_sizes(64, 256, 10) == (64, 64)  # chunk capped at the shard
