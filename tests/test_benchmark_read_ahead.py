"""benchmarks/read_ahead.py: its reading thread delivers the loop's batches unchanged, errors where
they were due, and its summary of train.tsv (the training runs themselves are the benchmark)."""

from __future__ import annotations

import math

import pytest
import torch
from benchmark_script import load_benchmark

bench = load_benchmark("read_ahead")


def test_read_ahead_loader_gives_the_dataloaders_batches_in_order():
    data = [torch.full((3,), float(i)) for i in range(9)]
    plain = list(torch.utils.data.DataLoader(data, batch_size=2))
    it = iter(bench.ReadAheadLoader(data, batch_size=2))
    assert isinstance(it, bench.BackgroundBatches)
    got = list(it)
    assert len(got) == len(plain) == 5 and all(torch.equal(a, b) for a, b in zip(got, plain))
    with pytest.raises(StopIteration):
        next(it)


def test_an_error_of_the_source_is_raised_where_its_item_was_due():
    def source():
        yield from (0, 1)
        raise KeyError("sample 2 unreadable")

    it = bench.BackgroundBatches(source())
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(KeyError, match="sample 2 unreadable"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_summary_splits_the_first_epoch_from_the_run():
    windows = [(5, "0.06"), (10, "0.08"), (15, "0.01")]
    rows = [{"step": str(s), "loss": "1", "data_wait": w} for s, w in windows]
    got = bench.summarize(rows, epoch_steps=10)
    assert math.isclose(got["wait_first_epoch"], 0.07) and math.isclose(got["wait_run"], 0.05)
    rows.insert(0, {"step": "1", "loss": "1", "data_wait": "nan"})  # a window with no counted step
    assert math.isclose(bench.summarize(rows, epoch_steps=10)["wait_run"], 0.05)
