"""DataLoader workers (train.loader_workers, auto from the measured read cost on CUDA) and the
data-wait measurement of the training loop (train/loader.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from synthetic_store import make_store

from dspark_offline.store import open_store
from dspark_offline.train import loader
from dspark_offline.train.dataset import FeatureDataset
from dspark_offline.train.loader import (
    DataWait,
    auto_workers,
    loader_workers,
    probe_read_s_per_token,
    workers_to_keep_up,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    store = open_store(str(make_store(tmp_path_factory.mktemp("store") / "features.zarr", num_samples=12)))
    return FeatureDataset(store, np.arange(len(store)), None, cache_bytes=2**30)


@pytest.mark.parametrize(
    "cost, cores, workers, needed",
    [
        (213e-3 / 1152, 16, 3, 3),  # benchmarks/data_wait.py at Qwen3-8B width: 213 ms per 1,152 tokens
        (213e-3 / 1152, 2, 2, 3),  # too few cores: the minimum, and the shortfall is reported
        (1e-6, 16, 2, 1),  # cheap reads: the minimum of 2
        (1e-3, 8, 7, 13),  # at most the rank's cores less the one the step runs on
        (1e-3, 64, 13, 13),
    ],
)
def test_auto_workers_keep_the_assumed_step_fed(cost, cores, workers, needed):
    assert auto_workers(cost, cores) == (workers, needed)
    # what the count means: the fewest workers that read tokens faster than the assumed step eats
    # them, with 2 % to spare (as benchmarks/data_wait.py counts them)
    rate = loader.ASSUMED_TOKENS_PER_S / (1 - loader.WAIT_GOAL)
    assert needed / cost >= rate and (needed - 1) / cost < rate


def test_explicit_setting_is_used_on_any_device(dataset, monkeypatch):
    monkeypatch.setattr(loader, "probe_read_s_per_token", lambda *a: pytest.fail("no probe when set"))
    said = []
    assert loader_workers(0, CUDA, dataset, 2, said.append) == 0
    assert loader_workers(5, CPU, dataset, 2, said.append) == 5
    assert all("(train.loader_workers)" in s for s in said), said


def test_auto_on_cpu_is_zero_and_says_reading_is_part_of_the_step(dataset, monkeypatch):
    monkeypatch.setattr(loader, "probe_read_s_per_token", lambda *a: pytest.fail("no probe on CPU"))
    said = []
    assert loader_workers(None, CPU, dataset, 2, said.append) == 0
    assert len(said) == 1 and "reading is part of the step" in said[0]


def test_auto_on_cuda_follows_the_probe_and_the_cores(dataset, monkeypatch):
    said = []
    monkeypatch.setattr(loader, "cores_per_rank", lambda: 16)
    monkeypatch.setattr(loader, "probe_read_s_per_token", lambda ds, micro: 4e-4)  # 4.8 -> 5 workers
    assert loader_workers(None, CUDA, dataset, 2, said.append) == 5
    assert "5 DataLoader worker(s)" in said[-1] and "400 µs/token" in said[-1], said
    monkeypatch.setattr(loader, "cores_per_rank", lambda: 3)
    assert loader_workers(None, CUDA, dataset, 2, said.append) == 2
    assert "only 3 CPU core(s) per rank" in said[-1], said


def test_probe_measures_reads_without_filling_the_cache(dataset):
    cost = probe_read_s_per_token(dataset, 2)
    assert 0 < cost < 1 and math.isfinite(cost)
    assert dataset._cached_bytes == 0  # the training dataset's cache is left to the workers


def test_data_wait_share_per_window_without_the_start_up_step():
    said = []
    w = DataWait(0, CPU, said.append)
    w.waited(5.0)  # step 1: start-up (workers start, first reads), not counted
    w.step(6.0)
    assert math.isnan(w.window(1))
    for wait, total in [(0.1, 1.0), (0.3, 1.0)]:
        w.waited(wait / 2)  # two micro-batches
        w.waited(wait / 2)
        w.step(total)
    assert w.window(3) == pytest.approx(0.2)
    w.waited(0.0)
    w.step(1.0)
    assert w.window(4) == 0.0  # a new window
    assert said == []  # CPU without workers: reading is part of the step, never a warning


@pytest.mark.parametrize("workers, device", [(2, CUDA), (0, CUDA), (2, CPU)])
def test_one_warning_naming_the_field_when_reads_do_not_keep_up(workers, device):
    said = []
    w = DataWait(workers, device, said.append)
    w.step(1.0)  # start-up
    for share in (0.01, 0.05, 0.5):
        w.waited(share)
        w.step(1.0)
        w.window(0)
    assert len(said) == 1, said  # once per run: at the first window above 2 %
    assert "5.0%" in said[0] and "train.loader_workers" in said[0] and f"with {workers} " in said[0]
    needed = 3 if workers == 2 else 1  # 2 / (0.95 x 0.98) = 2.15; 0.05 / (0.95 x 0.98) = 0.05
    assert f"about {needed} worker(s) would keep up" in said[0]


@pytest.mark.parametrize(
    "workers, share, needed",
    [
        (2, 0.42, 4),  # the Qwen3-8B-width data_wait row: 2 workers, 42 % waiting
        (2, 0.61, 6),
        (3, 0.10, 4),
        (8, 0.05, 9),
        (0, 0.30, 1),  # reads inside the step: one worker takes 0.3 T per batch, under 0.7 T
        (0, 0.60, 2),  # 0.6 T per batch > 0.4 T of compute
        (4, 0.995, None),  # all waiting: no step time to size against
    ],
)
def test_workers_to_keep_up_from_the_measured_wait(workers, share, needed):
    assert workers_to_keep_up(workers, share) == needed
    if needed is None:
        return
    # the meaning: n workers' read time per batch fits in the compute time (2 % slack), n - 1 do not
    read, compute = (workers or share), (1 - share) * (1 - loader.WAIT_GOAL)
    assert read / needed <= compute and (needed == 1 or read / (needed - 1) > compute)
