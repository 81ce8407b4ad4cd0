"""Shard-writer throughput beside raw write + fsync on the same disk, for 1..N writer workers.

For each feature width (Qwen3-8B: 5 layers x H 4096 bf16 + final hidden + top-64, ~49 KB/token;
SmolLM2: 5 x 576, ~7.3 KB/token) and each writer count, in one run and on one directory:

- **raw**: the same logical bytes written as one plain file per shard by N threads, each file
  fsynced (the disk's own rate: what a writer could at best reach);
- **writer**, engine `ours`: the dump's path (`store.background.BackgroundWriter(N)`: N=1 a thread,
  N>1 writer processes fed through shared memory): a buffer lent per shard, filled by the main
  thread (a copy, as the dump fills it from the forward), submitted; then every object fsynced
  (timed);
- **writer**, engine `tensorstore` (the `tensorstore` extra; `benchmarks/writer_tensorstore.py`): the same
  feature arrays, created with our store's layout (shape, shard and chunk shape, storage dtype,
  codec chain), written whole shard by whole shard by tensorstore's C++ thread pools limited to N
  threads (`data_copy_concurrency`, `file_io_concurrency`); then every file fsynced (timed). After
  each measurement zarr reads its arrays back (bit-identical to the data written, or the run
  fails) and their zarr.json is compared with ours (differences printed; `--quick` fails on any).
- **writer**, engine `dump-tensorstore`: the dump's path with `dump.writer_engine: tensorstore`
  (`BackgroundWriter(N, engine="tensorstore")`, `store/tensorstore_engine.py`): as `ours`, but the
  shards are committed by tensorstore's pools (N threads) driven from one thread; the part it
  writes must equal ours (every feature array's zarr.json and shard object), else the run fails.

Printed per row: MB/s of logical bytes (wall), writer / raw, MB per CPU-second of all writer
work (main process + writer processes: the per-core rate that extrapolates to a host with more
cores), and the bytes on disk / logical bytes. Features are random normals in bf16 (real hidden
states compress somewhat better). On a shared machine the wall rates move with the load: the
ratios of rows measured back to back and the per-CPU-second rates are the numbers to read.

    python benchmarks/writer.py                  # both widths, 1, 2, 4 workers (~ 5-10 min on 2 cores)
    python benchmarks/writer.py --quick          # tiny widths, seconds (what the test runs)
    python benchmarks/writer.py --dir /nvme/tmp --workers 1,4,8,16 --shards 16
    python benchmarks/writer.py --engines ours,dump-tensorstore  # default: all three with tensorstore
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

WIDTHS = {  # name: (hidden size, layers, top-k, shard tokens)
    "qwen3-8b": (4096, 5, 64, 4096),
    "smollm2": (576, 5, 64, 16384),
    "tiny-a": (64, 3, 8, 512),  # --quick
    "tiny-b": (16, 2, 4, 512),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--dir", default=None, help="Directory on the disk to measure (default: a temp dir).")
    p.add_argument("--widths", default="qwen3-8b,smollm2", help=f"Comma list of {sorted(WIDTHS)}.")
    p.add_argument("--workers", default="1,2,4", help="Comma list of writer counts.")
    p.add_argument("--shards", type=int, default=6, help="Shards written per measurement.")
    p.add_argument("--shard-tokens", type=int, default=None, help="Tokens per shard (default per width).")
    p.add_argument("--compressor", default="zstd", choices=["zstd", "blosc", "none"])
    p.add_argument("--level", type=int, default=1)
    p.add_argument(
        "--engines",
        default=None,
        help="Comma list of writer engines: ours, tensorstore, dump-tensorstore (default: all three when "
        "tensorstore imports, else ours).",
    )
    p.add_argument("--quick", action="store_true", help="Tiny widths, 3 shards, 1-2 workers.")
    return p.parse_args(argv)


ENGINES = ("ours", "tensorstore", "dump-tensorstore")


class BenchError(Exception):
    """Bad command-line input, or tensorstore's arrays are not our store's (exit 2)."""


class Row(NamedTuple):
    width: str
    workers: int
    engine: str
    raw_mb_s: float
    writer_mb_s: float
    writer_mb_per_cpu_s: float
    raw_mb_per_cpu_s: float
    on_disk: float

    @property
    def ratio(self) -> float:
        return self.writer_mb_s / self.raw_mb_s


def _manifest(hidden: int, layers: int, top_k: int, shard_tokens: int, compressor: str, level: int):
    from dspark_offline.store.manifest import (
        ArrayDtypes,
        DataInfo,
        Manifest,
        TargetInfo,
        fingerprint_fields,
        params_fingerprint,
    )

    target = TargetInfo(
        name="bench",
        path="/nowhere",
        weights_hash="w",
        architecture="Qwen3ForCausalLM",
        model_type="qwen3",
        num_hidden_layers=layers + 4,
        hidden_size=hidden,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=max(1, hidden // 8),
        intermediate_size=hidden * 3,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        vocab_size=64,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=False,
        dtype="bfloat16",
        mask_token_id=None,
        tokenizer_size=64,
        special_tokens={},
    )
    m = Manifest(
        target=target,
        tokenizer_hash="t",
        chat_template_hash="c",
        layer_ids=list(range(1, layers + 1)),
        top_k=top_k,
        dtypes=ArrayDtypes(hidden="bfloat16", final_hidden="bfloat16", head="bfloat16"),
        has_final_hidden=True,
        num_parts=1,
        shard_tokens=shard_tokens,
        chunk_tokens=min(256, shard_tokens),
        compressor=compressor,
        compression_level=level,
        data=DataInfo(
            prepared_path="bench",
            split="train",
            prepared_fingerprint="bench",
            max_length=512,
            num_samples=0,
            num_tokens=0,
        ),
        params_fingerprint="",
        created_by="benchmarks/writer.py",
    )
    return m.model_copy(update={"params_fingerprint": params_fingerprint(fingerprint_fields(m))})


def _shard_data(specs: dict, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One shard of plausible features in storage dtypes (bf16 bits for the states)."""
    from dspark_offline.store.dtypes import to_storage

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (logical, trailing) in specs.items():
        shape = (width, *trailing)
        if name == "topk_ids":
            t = torch.randint(0, 64, shape, generator=g, dtype=torch.int32)
        elif name == "topk_probs":
            t = torch.rand(shape, generator=g).sort(dim=-1, descending=True).values.to(torch.float16)
        else:
            t = torch.randn(shape, generator=g).to(torch.bfloat16)
        out[name] = to_storage(t, logical)
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fsync_tree(root: Path) -> int:
    """fsync every file under `root`; return their total size."""
    total = 0
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            total += p.stat().st_size
    return total


def measure_raw(where: Path, data: dict[str, np.ndarray], shards: int, workers: int) -> tuple[float, float]:
    """(MB/s, MB per CPU-s) of writing `shards` copies of `data` as fsynced files on `workers` threads."""
    where.mkdir(parents=True)
    nbytes = sum(a.nbytes for a in data.values())

    def write(ks):
        for k in ks:
            with open(where / f"shard-{k}", "wb") as f:
                f.writelines(memoryview(a).cast("B") for a in data.values())
                f.flush()
                os.fsync(f.fileno())

    t0, c0 = time.perf_counter(), _cpu()
    threads = [threading.Thread(target=write, args=(range(i, shards, workers),)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    shutil.rmtree(where)
    mb = nbytes * shards / 1e6
    return mb / wall, mb / max(cpu, 1e-9)


def measure_writer(
    where: Path, manifest, data: dict[str, np.ndarray], shards: int, workers: int, engine: str = "zarr"
):
    """(MB/s, MB per CPU-s, bytes on disk / logical, the part's layout: {feature array: its zarr.json,
    sha256 of its shard 0}) of the dump's writer path with `engine` (dump.writer_engine)."""
    from dspark_offline.store.background import BackgroundWriter
    from dspark_offline.store.plan import plan_part
    from dspark_offline.store.writer import open_part, open_store_for_write

    width = manifest.shard_tokens
    lengths = np.full(shards * (width // 512), 512) if width >= 512 else np.full(shards, width)
    plan = plan_part(lengths, 1, 0, width)
    head = {
        k: torch.zeros(64, manifest.target.hidden_size, dtype=torch.bfloat16)
        for k in ("embed_tokens", "lm_head")
    }
    head["final_norm"] = torch.ones(manifest.target.hidden_size, dtype=torch.bfloat16)
    root = open_store_for_write(str(where), manifest, lambda: head)
    n = plan.num_positions
    state = open_part(
        root,
        manifest,
        plan,
        lambda: (np.zeros(n, np.int32), np.zeros(n, np.uint8), np.arange(plan.num_samples, dtype=np.int64)),
    )
    part_dir = where / state.name
    before = _fsync_tree(part_dir)  # plan-known arrays: not part of the measurement
    t0, c0 = time.perf_counter(), _cpu()
    with BackgroundWriter(workers, engine=engine) as w:
        for shard in state.pending():
            bufs = w.buffers(state, shard)
            for name, a in data.items():
                bufs[name][...] = a  # the fill the dump does from the forward's output
            w.submit(state, shard, bufs)
    on_disk = _fsync_tree(part_dir) - before
    wall, cpu = time.perf_counter() - t0, _cpu() - c0 + w.cpu_s
    assert state.complete, "the writer did not finish the part"
    layout = _tensorstore_engine().layout(part_dir, data)  # what tensorstore's arrays are checked against
    shutil.rmtree(where)
    logical = sum(a.nbytes for a in data.values()) * shards
    return logical / 1e6 / wall, logical / 1e6 / max(cpu, 1e-9), on_disk / logical, layout


def _tensorstore_engine():
    """benchmarks/writer_tensorstore.py, imported by path (the scripts are no package)."""
    where = Path(__file__).with_name("writer_tensorstore.py")
    spec = importlib.util.spec_from_file_location("writer_tensorstore_bench", where)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure_tensorstore(where: Path, manifest, data, shards: int, workers: int, ours: dict, strict: bool):
    """(MB/s, MB per CPU-s, bytes on disk / logical) of tensorstore writing the same shards, then
    its check against our part's `ours` layout: data that zarr does not read back bit-identical
    fails the run, a zarr.json other than ours only when `strict` (else it is printed)."""
    engine = _tensorstore_engine()
    mb_s, mb_cpu, disk = engine.measure(where, manifest, data, shards, workers, _cpu, _fsync_tree)
    found = engine.check(where / "part-00000", ours, data, shards)
    shutil.rmtree(where)
    if found.data or (strict and found.metadata):
        raise BenchError(f"tensorstore's part at {where}: " + "; ".join(found.data + found.metadata))
    print(
        "    tensorstore check: zarr reads the data back bit-identical; "
        + ("zarr.json as ours" if not found.metadata else "zarr.json differs: " + "; ".join(found.metadata))
        + (
            "; shard objects byte-identical to ours"
            if found.same_bytes
            else "; shard objects differ from ours"
        ),
        flush=True,
    )
    return mb_s, mb_cpu, disk


def engines(arg: str | None) -> list[str]:
    """The engines to measure: `arg` (comma list) or, when None, all if tensorstore imports."""
    has_ts = importlib.util.find_spec("tensorstore") is not None
    if arg is None:
        if not has_ts:
            print("# tensorstore is not installed: measuring engine 'ours' only (the 'tensorstore' extra)")
        return list(ENGINES) if has_ts else ["ours"]
    names = [e.strip() for e in arg.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENGINES]
    if unknown or not names:
        raise BenchError(
            f"--engines {arg!r}: unknown engine(s) {unknown}; expected a comma list of {ENGINES}"
        )
    needs_ts = [e for e in names if "tensorstore" in e]
    if needs_ts and not has_ts:
        raise BenchError(
            f"--engines {','.join(needs_ts)}: the tensorstore package is not installed "
            "(the 'tensorstore' extra)"
        )
    return names


def run(args) -> list[Row]:
    from dspark_offline.store.manifest import feature_specs

    which = engines(args.engines)
    widths = ["tiny-a", "tiny-b"] if args.quick else args.widths.split(",")
    workers = [1, 2] if args.quick else [int(w) for w in args.workers.split(",")]
    shards = 3 if args.quick else args.shards
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="writer-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    if max(workers) > 1:  # start the writers' fork server now: once per dump, not per shard
        from dspark_offline.store.background import BackgroundWriter

        BackgroundWriter(2).close()
    try:
        for name in widths:
            hidden, layers, top_k, tokens = WIDTHS[name]
            tokens = args.shard_tokens or tokens
            m = _manifest(hidden, layers, top_k, tokens, args.compressor, args.level)
            data = _shard_data(feature_specs(m), tokens)
            per_token = sum(a.nbytes for a in data.values()) // tokens
            print(
                f"# {name}: {per_token} B/token, shard {tokens} tokens = "
                f"{per_token * tokens / 2**20:.0f} MiB, {shards} shards per measurement",
                flush=True,
            )
            layout = None  # our part's zarr.json + shard objects: the same for every writer count
            for n in workers:
                raw, raw_cpu = measure_raw(base / f"raw-{name}-{n}", data, shards, n)
                for engine in which:
                    where = base / f"{engine}-{name}-{n}.zarr"
                    if engine == "ours":
                        mb_s, mb_cpu, disk, layout = measure_writer(where, m, data, shards, n)
                    elif layout is None:  # our layout to compare with, untimed
                        *_, layout = measure_writer(base / f"layout-{name}.zarr", m, data, shards, 1)
                    if engine == "dump-tensorstore":
                        mb_s, mb_cpu, disk, theirs = measure_writer(where, m, data, shards, n, "tensorstore")
                        if theirs != layout:
                            raise BenchError(
                                f"{engine}'s part at {where} differs from ours: {theirs} vs {layout}"
                            )
                        print(
                            f"    {engine} check: zarr.json and shard objects byte-identical to ours",
                            flush=True,
                        )
                    elif engine == "tensorstore":
                        mb_s, mb_cpu, disk = measure_tensorstore(
                            where, m, data, shards, n, layout, args.quick
                        )
                    rows.append(Row(name, n, engine, raw, mb_s, mb_cpu, raw_cpu, disk))
                    print(
                        f"  workers {n}: raw {raw:.0f} MB/s, {engine} {mb_s:.0f} MB/s "
                        f"({mb_s / raw:.2f}x), {mb_cpu:.0f} MB/CPU-s",
                        flush=True,
                    )
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def table(rows: list[Row], compressor: str, level: int) -> str:
    head = [
        (
            f"## writer vs raw write+fsync ({compressor}-{level} + crc32c; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
        ),
        "",
        (
            "| width | workers | engine | raw MB/s | writer MB/s | writer / raw | writer MB per CPU-s "
            "| on disk / logical |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    body = [
        f"| {r.width} | {r.workers} | {r.engine} | {r.raw_mb_s:.4g} | {r.writer_mb_s:.4g} | {r.ratio:.3g} | "
        f"{r.writer_mb_per_cpu_s:.4g} | {r.on_disk:.2f} |"
        for r in rows
    ]
    notes = []
    for name in dict.fromkeys(r.width for r in rows):
        for engine in dict.fromkeys(r.engine for r in rows):
            mine = [r for r in rows if r.width == name and r.engine == engine]
            best = max(mine, key=lambda r: r.writer_mb_per_cpu_s)
            notes.append(
                f"{name} ({engine}): {best.writer_mb_per_cpu_s:.0f} MB per CPU-second -> "
                f"{1200 / best.writer_mb_per_cpu_s:.1f} cores per 1.2 GB/s (one H200's Qwen3-8B prefill)"
            )
    ours = {(r.width, r.workers): r for r in rows if r.engine == "ours"}
    for r in rows:
        base = ours.get((r.width, r.workers))
        if r.engine != "ours" and base is not None:
            notes.append(
                f"{r.width}, {r.workers} workers: {r.engine} / ours = "
                f"{r.writer_mb_s / base.writer_mb_s:.2f}x wall, "
                f"{r.writer_mb_per_cpu_s / base.writer_mb_per_cpu_s:.2f}x per CPU-second"
            )
    return "\n".join([*head, *body, "", *notes])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(rows, args.compressor, args.level))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
