"""benchmarks/train_memory.py: its two paths (deferred block states, what training runs, and every
block at once, the path before) train on the same objective, here on tiny dims in this process."""

from __future__ import annotations

import pytest
from benchmark_script import load_benchmark


def test_both_paths_measure_the_same_step():
    bench = load_benchmark("train_memory")
    args = bench.parse_args(
        [
            "--vocab",
            "128",
            "--hidden",
            "32",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--intermediate",
            "48",
            "--markov-rank",
            "8",
            "--seq-len",
            "40",
            "--repeats",
            "1",
        ]
    )
    rows = {
        p: bench.child(args, {"num_anchors": 12, "path": p, "chunk_blocks": 5})
        for p in ("deferred", "at_once")
    }
    assert rows["deferred"]["blocks"] == rows["at_once"]["blocks"] == 12
    assert rows["deferred"]["loss"] == pytest.approx(rows["at_once"]["loss"], rel=1e-6)


def test_live_peak_is_the_most_bytes_held_at_once():
    """--memory live: the running sum of torch's CPU allocation records, from the profiler itself."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    bench = load_benchmark("train_memory")
    before = torch.ones(1 << 20)  # held before: not counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.ones(1 << 22)  # 16 MiB
        b = a * 2  # 32 MiB held at once
        del a, b
        c = torch.ones(1 << 21)  # 8 MiB, after the peak
    peak = bench.live_peak_bytes(prof.profiler.kineto_results.events())
    assert 32 * 2**20 <= peak < 33 * 2**20, peak
    del before, c


def test_live_memory_measures_a_step():
    bench = load_benchmark("train_memory")
    tiny = ["--vocab", "128", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "48"]
    args = bench.parse_args(
        [*tiny, "--markov-rank", "8", "--seq-len", "40", "--repeats", "1", "--memory", "live"]
    )
    row = bench.child(args, {"num_anchors": 12, "path": "deferred", "chunk_blocks": 5})
    assert row["step_peak_mib"] > 0 and row["blocks"] == 12
