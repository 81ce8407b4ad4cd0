"""How many DataLoader workers feed a rank, and how much of a step waits for them.

* :func:`loader_workers` — ``train.loader_workers``, or when it is null: 0 on CPU (every core
  already computes the step; a worker would only compete with it), and on CUDA as many as keep
  an assumed GPU step fed, from the read cost of a few micro-batches measured at start-up,
  within the CPU cores of this rank.
* :class:`DataWait` — the share of each logging window's step wall time spent in
  ``next(batches)`` (``data_wait`` in ``train.tsv``), and one warning naming
  ``train.loader_workers`` when it goes above :data:`WAIT_GOAL` while workers (or a GPU) should
  have hidden the reads.

Why the GPU case needs arithmetic: at Qwen3-8B width a sample is ~54 MB of features and costs
~0.2 CPU-s to read, decompress and batch, so the two workers that used to be the CUDA default
left a 0.1 s step waiting 42-61 % of its time (benchmarks/data_wait.py, README "Data wait").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from dspark_offline.train.dataset import FeatureDataset, collate

# Training tokens per second that one GPU's drafter step is assumed to consume, for the automatic
# worker count: the 0.1 s step per micro-batch of ~1,150 tokens that benchmarks/data_wait.py
# assumes for a 5-layer drafter at Qwen3-8B width on an H200. An assumption, not a measurement:
# train.tsv's data_wait says how it held up, and the warning names the field to raise.
ASSUMED_TOKENS_PER_S = 12_000
WAIT_GOAL = 0.02  # share of the step spent waiting for data that is acceptable
PROBE_BATCHES = 3  # micro-batches read at start-up to measure the read cost (after one untimed item)
MIN_AUTO_WORKERS = 2  # the CUDA default before the cost was measured: reads overlap the step


def cores_per_rank() -> int:
    """CPU cores this process may use, shared with the other ranks of its node."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(1, torch.cuda.device_count())
    return max(1, len(os.sched_getaffinity(0)) // local)


def probe_read_s_per_token(dataset: FeatureDataset, micro_batch_size: int) -> float:
    """Wall seconds per token to read, decode and collate :data:`PROBE_BATCHES` micro-batches of
    samples spread over `dataset`, in this process, bypassing the sample cache (a first-epoch read)."""
    uncached = FeatureDataset(dataset.store, dataset.indices, dataset.max_length)
    picks = np.linspace(0, len(uncached) - 1, 1 + PROBE_BATCHES * micro_batch_size).round().astype(int)
    collate([uncached[int(picks[0])]])  # untimed: opens the arrays, first-touch costs
    t0, tokens = time.perf_counter(), 0
    for start in range(1, len(picks), micro_batch_size):
        batch = collate([uncached[int(k)] for k in picks[start : start + micro_batch_size]])
        tokens += int(batch["lengths"].sum())
    return (time.perf_counter() - t0) / max(1, tokens)


def auto_workers(read_s_per_token: float, cores: int) -> tuple[int, int]:
    """(workers, workers needed): a worker prepares one micro-batch while the GPU consumes
    read-cost / step-time of them, so ``ceil(read_s_per_token x ASSUMED_TOKENS_PER_S / 0.98)``
    keep up with 2 % slack; at least :data:`MIN_AUTO_WORKERS`, at most the rank's cores less the
    one the training process uses (when that is more than the minimum)."""
    needed = max(1, math.ceil(read_s_per_token * ASSUMED_TOKENS_PER_S / (1 - WAIT_GOAL)))
    return max(MIN_AUTO_WORKERS, min(needed, cores - 1)), needed


def loader_workers(
    setting: int | None,
    device: torch.device,
    dataset: FeatureDataset,
    micro_batch_size: int,
    say: Callable[[str], None],
) -> int:
    """DataLoader workers of this rank: `setting` (``train.loader_workers``) when given, else 0 on
    CPU and :func:`auto_workers` of a start-up read probe on CUDA. Says what it chose and why."""
    if setting is not None:
        say(f"loader: {setting} DataLoader worker(s) per rank (train.loader_workers)")
        return setting
    if device.type != "cuda":
        say(
            "loader: 0 DataLoader workers on CPU (train.loader_workers auto): reading is part of the "
            "step (train.tsv's data_wait is its share), not a wait to warn about"
        )
        return 0
    cost, cores = probe_read_s_per_token(dataset, micro_batch_size), cores_per_rank()
    workers, needed = auto_workers(cost, cores)
    short = f"; only {cores} CPU core(s) per rank, fewer than that needs" if needed > workers else ""
    say(
        f"loader: {workers} DataLoader worker(s) per rank (train.loader_workers auto): reading costs "
        f"{cost * 1e6:.0f} µs/token, {needed} worker(s) keep a step of {ASSUMED_TOKENS_PER_S:,} "
        f"tokens/s (assumed) fed{short}"
    )
    return workers


class DataWait:
    """The share of step wall time spent waiting for the next batch, per logging window.

    The loop reports each ``next(batches)`` (:meth:`waited`) and each step's wall time
    (:meth:`step`); :meth:`window` returns the share over the steps since its last call. The first
    step of a run (worker start-up, the first reads: once per run, not per step) is not counted.
    With workers or on a GPU, waiting means the reads did not keep up: the first window above
    :data:`WAIT_GOAL` prints one warning naming ``train.loader_workers`` (once per run). On CPU
    with 0 workers reading is part of the step; `loader_workers` has said so and nothing warns.
    The warning also says how many workers would keep up at the step time measured in that window
    (:func:`workers_to_keep_up`), so the count to set does not rest on the assumed step.
    """

    def __init__(self, workers: int, device: torch.device, say: Callable[[str], None]) -> None:
        self.should_hide_reads = workers > 0 or device.type == "cuda"
        self.workers, self.say = workers, say
        self._step_wait = self._wait = self._total = 0.0
        self._first, self._warned = True, False

    def waited(self, seconds: float) -> None:
        self._step_wait += seconds

    def step(self, seconds: float) -> None:
        if not self._first:
            self._wait, self._total = self._wait + self._step_wait, self._total + seconds
        self._first, self._step_wait = False, 0.0

    def window(self, at_step: int) -> float:
        """The share of the steps since the last call (nan when none was counted); may warn."""
        share = self._wait / self._total if self._total > 0 else math.nan
        self._wait = self._total = 0.0
        if self.should_hide_reads and share > WAIT_GOAL and not self._warned:
            self._warned = True
            needed = workers_to_keep_up(self.workers, share)
            estimate = (
                f"at this step time about {needed} worker(s) would keep up; " if needed is not None else ""
            )
            self.say(
                f"warning: steps up to {at_step} waited {share:.1%} of their time for the next batch "
                f"with {self.workers} DataLoader worker(s) (goal <= {WAIT_GOAL:.0%}): {estimate}raise "
                f"train.loader_workers (this rank has {cores_per_rank()} CPU core(s)) or train.cache_gb"
            )
        return share


def workers_to_keep_up(workers: int, share: float) -> int | None:
    """DataLoader workers that would have kept the wait within :data:`WAIT_GOAL`, from a window in
    which `workers` left the step waiting `share` (above the goal) of its wall time T (compute
    (1 - share) T).

    Waiting means the readers were the bottleneck: `workers` > 0 busy workers delivered one batch
    per T, so one worker needs ``workers x T`` per batch; with 0 workers the batch was read inside
    the step, in ``share x T``. Either way n workers keep up when (read time per batch) / n fits in
    the compute time with 2 % to spare. An estimate: it assumes more workers find free cores and
    disk bandwidth. None when the step did (almost) nothing but wait."""
    compute = 1.0 - share
    if compute < 0.01:
        return None
    read = workers if workers > 0 else share  # read time per batch, in step wall times
    return max(1, math.ceil(read / (compute * (1 - WAIT_GOAL))))
