"""benchmarks/fp8_hidden.py: its bytes/token accounting is `inspect`'s, its error rows are right."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import load_benchmark
from synthetic_store import make_store

from dspark_offline.store.inspect import inspect


def test_array_bytes_add_up_to_inspect(tmp_path):
    bench = load_benchmark("fp8_hidden")
    path = make_store(tmp_path / "f.zarr", num_samples=7, num_parts=2)
    sizes, tokens, samples = bench.array_bytes(str(path))
    info = inspect(str(path))["total"]
    assert sum(sizes.values()) == info["part_bytes"] and tokens == info["num_tokens"] and samples == 7
    assert {"hidden", "final_hidden", "topk_ids", "topk_probs", "input_ids", "sample_start"} <= set(sizes)


def test_error_rows_are_relative_per_token_and_layer():
    bench = load_benchmark("fp8_hidden")
    ref = torch.ones(2, 3, 4)  # [S, L, H]
    got = ref.clone()
    got[1, 2] *= 1.5  # one row off by 50 %
    rel, rest, err, norm = bench.error_rows(ref, got)
    assert rel.shape == (6,) and rel[5] == pytest.approx(0.5) and rel[:5].abs().sum() == 0
    assert err == pytest.approx(4 * 0.25) and norm == pytest.approx(24.0)
    outlier = torch.tensor([[[100.0, 1.0, 1.0, 1.0]]])  # [1, 1, 4]: the small channels' error shows in rest
    rel, rest, _, _ = bench.error_rows(outlier, outlier * torch.tensor([1.0, 1.5, 1.5, 1.5]))
    assert rest[0] == pytest.approx(0.5) and rel[0] < 0.01
