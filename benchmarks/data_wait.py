"""The share of a training step spent waiting for data: DataLoader workers, prefetch, shard reads.

Drives the training loop's data path exactly as `train/loop.py` builds it (`FeatureDataset` over
the store reader, `ResumableSampler`, `collate`, `DataLoader(num_workers=...)`, and the anchor
sampling that follows `next(...)`) over a synthetic store written by the real writer, and times
`next(batches)` against the whole step. The drafter's compute is a sleep of `--step-s` seconds:
on a GPU the host is idle while the step runs, which is what lets the loader workers read ahead;
on CPU the default uses 0 workers, so reads are inline and the sleep stands in for compute.
The store's files are evicted from the page cache before each run (posix_fadvise DONTNEED on
our own files only): reads come from the disk, as in a first epoch (`train.cache_gb` is off here;
later epochs read from memory).

Two configurations by default, `--epochs` (2) each:

- `smollm2`: the embedded default's shape (H 576, 5 layers + final hidden, top-64, bf16; 256
  samples of 32-350 tokens; micro batch 2; 0 workers as on CPU; step 0.42 s, the default's
  measured CPU step);
- `qwen3-8b`: Qwen3-8B's width (H 4096; 48 samples of 256-2048 tokens; micro batch 1; 2 workers,
  the CUDA default before `train.loader_workers` auto (train/loader.py); step 0.10 s, an
  *assumed* H200 step of the 5-layer drafter: give the measured one with --step-s).

Also printed: the loader's CPU seconds per batch (this process and its workers), and from it the
loader workers a host needs for <= 2 % waiting at that step time, given free cores (the rates
measured on this shared 2-core machine are what extrapolates, not its wall times).
`smollm2` keeps the default `train.cache_gb` (4 GiB): from its second epoch samples come from
memory, which is what the default's 10 epochs mostly are. With loader workers, each config is
run a second time with the collate that allocated batches in the worker's own memory (torch then
copies every batch into shared memory to hand it over): the CPU per batch of both, and the ratio.

    python benchmarks/data_wait.py                      # both (~2-4 min on 2 cores)
    python benchmarks/data_wait.py --quick              # tiny, seconds (what the test runs)
    python benchmarks/data_wait.py --configs qwen3-8b --workers 4 --step-s 0.2
    python benchmarks/data_wait.py --configs smollm2 --chunk-tokens 256,128,64 --epochs 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# name: (hidden, layers, top_k, samples, min len, max len, micro, loader workers, step s, cache GiB)
CONFIGS = {
    "smollm2": (576, 5, 64, 256, 32, 350, 2, 0, 0.42, 4.0),
    "qwen3-8b": (4096, 5, 64, 48, 256, 2048, 1, 2, 0.10, 0.0),
    "tiny": (64, 2, 8, 24, 16, 96, 2, 2, 0.01, 0.0),  # --quick
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--configs", default="smollm2,qwen3-8b", help=f"Comma list of {sorted(CONFIGS)}.")
    p.add_argument("--dir", default=None, help="Where to write the synthetic stores (default: a temp dir).")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default per config).")
    p.add_argument("--step-s", type=float, default=None, help="Drafter step seconds (default per config).")
    p.add_argument("--epochs", type=int, default=2, help="Epochs per config (the first reads the disk).")
    p.add_argument(
        "--chunk-tokens",
        default="256",
        help="Zarr chunk (unit of reading) in tokens; a comma list measures each, side by side.",
    )
    p.add_argument("--quick", action="store_true", help="A tiny store, seconds.")
    return p.parse_args(argv)


class Result(NamedTuple):
    config: str
    epoch: int
    workers: int
    step_s: float
    steps: int
    wait_s: float
    total_s: float
    cpu_per_batch_s: float  # CPU seconds of the loader (main process + its workers) per batch

    @property
    def fraction(self) -> float:
        return self.wait_s / self.total_s


def _writer_bench():
    """benchmarks/writer.py (its synthetic manifest), imported by path: the scripts are no package."""
    spec = importlib.util.spec_from_file_location("writer_bench", Path(__file__).with_name("writer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_store(
    path: Path,
    hidden: int,
    layers: int,
    top_k: int,
    lengths: np.ndarray,
    seed: int = 0,
    chunk_tokens: int = 256,
) -> str:
    """A complete store of random bf16 features, written through the dump's writer."""
    from dspark_offline.store.background import BackgroundWriter
    from dspark_offline.store.manifest import feature_specs
    from dspark_offline.store.plan import plan_part
    from dspark_offline.store.writer import open_part, open_store_for_write

    shard_tokens = max(4096, int(lengths.max()))
    shard_tokens = -(-shard_tokens // 256) * 256
    m = _writer_bench()._manifest(hidden, layers, top_k, shard_tokens, "zstd", 1)
    m = m.model_copy(
        update={
            "chunk_tokens": chunk_tokens,
            "data": m.data.model_copy(
                update={
                    "num_samples": len(lengths),
                    "num_tokens": int(lengths.sum()),
                    "max_length": int(lengths.max()),
                }
            ),
        }
    )
    from dspark_offline.store.manifest import fingerprint_fields, params_fingerprint

    m = m.model_copy(update={"params_fingerprint": params_fingerprint(fingerprint_fields(m))})
    head = {k: torch.zeros(64, hidden, dtype=torch.bfloat16) for k in ("embed_tokens", "lm_head")}
    head["final_norm"] = torch.ones(hidden, dtype=torch.bfloat16)
    root = open_store_for_write(str(path), m, lambda: head)
    plan = plan_part(lengths, 1, 0, shard_tokens)
    rng = np.random.default_rng(seed)
    n = plan.num_positions
    ids = rng.integers(0, 64, n).astype(np.int32)
    mask = (rng.random(n) < 0.7).astype(np.uint8)
    state = open_part(root, m, plan, lambda: (ids, mask, plan.source_index.astype(np.int64)))
    g = torch.Generator().manual_seed(seed)
    specs = feature_specs(m)
    with BackgroundWriter(1) as w:
        for shard in state.pending():
            bufs = w.buffers(state, shard)
            width = shard.stop - shard.start
            for name, a in bufs.items():
                if name == "topk_ids":
                    a[...] = torch.randint(0, 64, a.shape, generator=g, dtype=torch.int32).numpy()
                elif name == "topk_probs":
                    a[...] = torch.rand(a.shape, generator=g).sort(-1, descending=True).values.half().numpy()
                else:  # bf16 states as their bits
                    bits = (
                        torch.randn((width, *specs[name][1]), generator=g)
                        .to(torch.bfloat16)
                        .view(torch.int16)
                    )
                    a[...] = bits.numpy().view(a.dtype)
            w.submit(state, shard, bufs)
    return str(path)


def evict(path: str) -> None:
    """Drop our store's pages from the page cache, so the reads below go to the disk."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loader(store_path: str, micro: int, workers: int, cache_gb: float):
    """The training loop's batches iterator (train/loop.py) over the whole store; steps per epoch."""
    from torch.utils.data import DataLoader

    from dspark_offline.store import open_store
    from dspark_offline.train.dataset import FeatureDataset, collate
    from dspark_offline.train.sampler import ResumableSampler

    store = open_store(store_path)
    indices = np.arange(len(store), dtype=np.int64)
    sampler = ResumableSampler(
        len(indices), micro_batch_size=micro, grad_accum=1, world_size=1, rank=0, seed=0
    )
    dataset = FeatureDataset(store, indices, None, int(cache_gb * 2**30))
    data = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return iter(data), len(indices) // micro


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def drive(store_path: str, micro: int, workers: int, step_s: float, cache_gb: float = 0.0, epochs: int = 1):
    """Per epoch: (seconds waiting in next(), seconds in all, steps). The first batch is a warm-up
    (worker start-up is once per run, not per step). Also the loader's CPU seconds per batch
    (this process and its workers, counted when they exit at the end)."""
    from dspark_offline.train.anchors import batch_anchors

    c0 = _cpu_s()
    batches, per_epoch = loader(store_path, micro, workers, cache_gb)
    batch = next(batches)  # warm-up: workers start, first reads
    out, step = [], 1
    for epoch in range(epochs):
        wait, t_start, n = 0.0, time.perf_counter(), per_epoch - (1 if epoch == 0 else 0)
        for _ in range(n):
            t0 = time.perf_counter()
            batch = next(batches)
            batch_anchors(batch, 512, 0, step)  # the loop does it right after next()
            wait += time.perf_counter() - t0
            step += 1
            time.sleep(step_s)  # the drafter step
        out.append((wait, time.perf_counter() - t_start, n))
    del batches, batch  # workers exit: their CPU time is counted now
    cpu = _cpu_s() - c0  # sleeping costs no CPU
    return out, cpu / step


def _copying_batch_tensor(shape, dtype):
    """The collate before train/dataset.py allocated batches in shared memory: zeros in the
    worker's own memory, then copied into shared memory when handed over."""
    return torch.zeros(shape, dtype=dtype)


@contextlib.contextmanager
def _patched_batch_tensor(fn):
    """Swap the collate's batch allocation (DataLoader workers fork, so they inherit the swap)."""
    from dspark_offline.train import dataset

    real = dataset._batch_tensor
    if fn is not None:
        dataset._batch_tensor = fn
    try:
        yield
    finally:
        dataset._batch_tensor = real


def run(args) -> list[Result]:
    names = ["tiny"] if args.quick else args.configs.split(",")
    chunks = [int(c) for c in str(args.chunk_tokens).split(",")]
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="data-wait-"))
    base.mkdir(parents=True, exist_ok=True)
    out: list[Result] = []
    try:
        for name in names:
            first = None
            for chunk in chunks:
                label = name if len(chunks) == 1 else f"{name} (chunk {chunk})"
                rows = measure_store(args, base, name, label, chunk)
                out += rows
                first = first or rows[0]
                if rows[0] is not first:  # side by side: other chunk sizes against the first
                    print(
                        f"  loader CPU per batch, chunk {chunk} / chunk {chunks[0]}: "
                        f"{rows[0].cpu_per_batch_s / first.cpu_per_batch_s:.2f}x",
                        flush=True,
                    )
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return out


def measure_store(args, base: Path, name: str, label: str, chunk: int) -> list[Result]:
    """One synthetic store of config `name` with `chunk`-token chunks, driven by every variant."""
    hidden, layers, top_k, samples, lo, hi, micro, workers, step_s, cache_gb = CONFIGS[name]
    workers = workers if args.workers is None else args.workers
    step_s = step_s if args.step_s is None else args.step_s
    lengths = np.random.default_rng(1).integers(lo, hi + 1, samples)
    t0 = time.perf_counter()
    path = make_store(base / f"{name}-{chunk}.zarr", hidden, layers, top_k, lengths, chunk_tokens=chunk)
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    print(
        f"# {label}: {samples} samples, {int(lengths.sum())} tokens, {size / 2**20:.0f} MiB on disk "
        f"(written in {time.perf_counter() - t0:.0f} s); micro batch {micro}, {workers} loader "
        f"workers, step {step_s} s, cache {cache_gb} GiB, chunk {chunk} tokens",
        flush=True,
    )
    variants = [(label, None)]
    if workers > 0 and not args.quick:  # side by side: collate copying the batch to shared memory
        variants.append((f"{label} (copying collate)", _copying_batch_tensor))
    out = []
    for variant, patch in variants:
        evict(path)
        with _patched_batch_tensor(patch):
            epochs, cpu_per_batch = drive(path, micro, workers, step_s, cache_gb, args.epochs)
        for e, (wait, total, steps) in enumerate(epochs):
            r = Result(variant, e + 1, workers, step_s, steps, wait, total, cpu_per_batch)
            print(
                f"  {variant} epoch {e + 1}: waiting {wait / total:.1%} of the step time "
                f"({wait:.2f} of {total:.1f} s, {steps} steps); "
                f"loader CPU {cpu_per_batch * 1e3:.0f} ms/batch",
                flush=True,
            )
            out.append(r)
    if len(variants) > 1:
        a, b = out[-1].cpu_per_batch_s, out[0].cpu_per_batch_s
        print(f"  loader CPU per batch, copying collate / shared-memory collate: {a / b:.2f}x", flush=True)
    shutil.rmtree(path)
    return out


def table(results: list[Result]) -> str:
    lines = [
        (
            f"## data wait (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; store "
            "evicted from the page cache before the first epoch)"
        ),
        "",
        (
            "| config | epoch | loader workers | step s | steps | wait s | total s | wait / step | "
            "loader CPU ms/batch | workers for <= 2 % |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # a worker keeps up when its CPU per batch fits in (workers x step); 2 % slack for the rest
        need = max(1, -(-int(r.cpu_per_batch_s * 1e6) // int(r.step_s * 0.98 * 1e6))) if r.step_s else "-"
        lines.append(
            f"| {r.config} | {r.epoch} | {r.workers} | {r.step_s:.2f} | {r.steps} | {r.wait_s:.2f} "
            f"| {r.total_s:.1f} | {r.wait_s / r.total_s:.2%} | {r.cpu_per_batch_s * 1e3:.0f} | {need} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
