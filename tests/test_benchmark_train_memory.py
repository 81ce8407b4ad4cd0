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
