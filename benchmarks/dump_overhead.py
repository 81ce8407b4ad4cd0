"""Dump overhead: the full stage-1 dump vs a bare target forward, side by side in one run.

What is compared (same prepared samples, same batches, same process, same threads):

- **dump**: ``dspark_offline.dump.run(params)`` end to end — target load, token checks, store
  creation, hook capture, chunked fp32 top-k, conversion and Zarr writes (background thread).
  While it runs, ``HFTarget.forward`` is wrapped to record every batch it receives and the
  time spent inside it.
- **bare**: ``AutoModelForCausalLM.from_pretrained`` + ``model(input_ids, attention_mask)``
  producing full logits, over exactly the recorded batches — the cheapest thing that "runs
  the target once over the data".

Printed ratios (target: dump / bare <= 1.10):

- ``dump / bare``: whole dump wall time over bare load + bare forwards.
- ``target.forward / bare forward``: the backend's own overhead per batch (hooks, top-k, copies).
- ``interleaved``: the same ratio measured batch by batch on one loaded model, alternating
  ``HFTarget.forward`` and ``model(...)`` on each batch (min of ``--repeats`` tries per batch),
  which cancels most machine-load drift on a shared host.

Repeats alternate dump and bare so machine-load drift hits both; the minimum of each is used.
Prepared data is created once under ``--workdir`` with ``dspark_offline.prepare`` (the
embedded ShareGPT by default) and reused when it already holds the requested sample count.

CPU: ``OMP_NUM_THREADS=1 python benchmarks/dump_overhead.py`` (~1-2 min for 32 samples).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--target", default="embedded:smollm2", help="Target path or 'embedded:smollm2'.")
    p.add_argument("--source", default="embedded:sharegpt", help="Conversations for prepare.")
    p.add_argument("--num-samples", type=int, default=32, help="Prepared training samples (>= 32).")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sample at most.")
    p.add_argument("--batch-tokens", type=int, default=None, help="dump.batch_tokens (default: params).")
    p.add_argument("--top-k", type=int, default=None, help="dump.top_k (default: params).")
    p.add_argument("--repeats", type=int, default=2, help="Alternating dump/bare rounds; min is reported.")
    p.add_argument("--dtype", default="auto", help="target.dtype.")
    p.add_argument("--device", default="auto", help="target.device.")
    p.add_argument("--no-interleaved", action="store_true", help="Skip the batch-interleaved comparison.")
    p.add_argument("--workdir", default=None, help="Where prepared data and stores go (default: a temp dir).")
    return p.parse_args()


def make_params(args: argparse.Namespace, workdir: Path):
    from dspark_offline.config import Params

    dump = {"store": str(workdir / "features.zarr"), "overwrite": True}
    if args.batch_tokens:
        dump["batch_tokens"] = args.batch_tokens
    if args.top_k:
        dump["top_k"] = args.top_k
    return Params.model_validate(
        {
            "target": {"path": args.target, "dtype": args.dtype, "device": args.device},
            "prepare": {
                "source": args.source,
                "output": str(workdir / "prepared"),
                "num_samples": args.num_samples,
                "num_eval_samples": 0,
                "max_length": args.max_length,
            },
            "dump": dump,
        }
    )


def ensure_prepared(params) -> None:
    from dspark_offline import prepare
    from dspark_offline.data.errors import PreparedDataError
    from dspark_offline.data.prepared import PreparedSplit

    try:
        split = PreparedSplit.load(params.prepare.output, "train")
        if (
            len(split) == params.prepare.num_samples
            and split.meta.get("max_length") == params.prepare.max_length
        ):
            return
    except PreparedDataError:  # missing or partial: (re)create it
        pass
    prepare.run(params)


def timed_dump(params, store: Path) -> tuple[float, float, list]:
    """Run the full dump into a fresh store; return (wall s, s inside target.forward, batches)."""
    from dspark_offline import dump
    from dspark_offline.target.hf_backend import HFTarget

    batches, inside = [], [0.0]
    original = HFTarget.forward

    def recording_forward(self, input_ids, attention_mask):
        batches.append((input_ids.clone(), attention_mask.clone()))
        t = time.perf_counter()
        out = original(self, input_ids, attention_mask)
        inside[0] += time.perf_counter() - t
        return out

    shutil.rmtree(store, ignore_errors=True)
    run_params = params.model_copy(deep=True)
    run_params.dump.store = str(store)
    HFTarget.forward = recording_forward
    try:
        t0 = time.perf_counter()
        dump.run(run_params)
        wall = time.perf_counter() - t0
    finally:
        HFTarget.forward = original
    return wall, inside[0], batches


def timed_bare(params, batches: list) -> tuple[float, float]:
    """Load the target plainly and run ``model(...)`` (full logits) over the same batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from dspark_offline.target.device import resolve_device, resolve_dtype
    from dspark_offline.target.embedded import resolve_target_path

    t0 = time.perf_counter()
    device = resolve_device(params.target.device)
    path = resolve_target_path(params.target.path, params.target.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(params.target.dtype, device), attn_implementation="sdpa"
    )
    model.to(device).eval()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, S, V]
            logits.cpu()  # a consumer would read them; also syncs CUDA
    return load, time.perf_counter() - t0


def interleaved(params, batches: list, repeats: int) -> tuple[float, float]:
    """Per batch, alternate ``HFTarget.forward`` and ``model(...)`` on the same loaded model."""
    import torch
    from transformers import AutoConfig

    from dspark_offline.target.embedded import resolve_target_path
    from dspark_offline.target.hf_backend import HFTarget
    from dspark_offline.target.layers import resolve_layer_ids

    cfg = params.dump
    path = resolve_target_path(params.target.path, params.target.cache_dir)
    layer_ids = resolve_layer_ids(
        cfg.layer_ids, AutoConfig.from_pretrained(path).num_hidden_layers, cfg.num_layer_ids
    )
    target = HFTarget(
        params.target.path,
        layer_ids=layer_ids,
        top_k=cfg.top_k,
        store_final_hidden=params.dump_final_hidden(),
        dtype=params.target.dtype,
        device=params.target.device,
        cache_dir=params.target.cache_dir,
    )
    ours = bare = 0.0
    for ids, mask in batches:
        best_ours = best_bare = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            target.forward(ids, mask)
            best_ours = min(best_ours, time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                target.model(
                    input_ids=ids.to(target.device), attention_mask=mask.to(target.device)
                ).logits.cpu()
            best_bare = min(best_bare, time.perf_counter() - t)
        ours, bare = ours + best_ours, bare + best_bare
    return ours, bare


def main() -> None:
    import torch

    args = parse_args()
    if args.num_samples < 1 or args.repeats < 1:
        raise SystemExit("--num-samples and --repeats must be >= 1")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dump_overhead_"))
    workdir.mkdir(parents=True, exist_ok=True)
    params = make_params(args, workdir)
    ensure_prepared(params)
    print(f"[bench] workdir {workdir}; torch threads {torch.get_num_threads()}; repeats {args.repeats}")

    dumps, bares = [], []
    for r in range(args.repeats):
        wall, inside, batches = timed_dump(params, workdir / f"features-{r}.zarr")
        load, fwd = timed_bare(params, batches)
        dumps.append((wall, inside))
        bares.append((load, fwd))
        tokens = sum(int(m.sum()) for _, m in batches)
        padded = sum(m.numel() for _, m in batches)
        print(
            f"[bench] round {r}: dump {wall:.2f}s (target.forward {inside:.2f}s) | "
            f"bare load {load:.2f}s + forward {fwd:.2f}s | {len(batches)} batches, "
            f"{tokens} tokens ({padded} padded positions)"
        )
        shutil.rmtree(workdir / f"features-{r}.zarr", ignore_errors=True)

    dump_wall, dump_fwd = min(d[0] for d in dumps), min(d[1] for d in dumps)
    bare_load, bare_fwd = min(b[0] for b in bares), min(b[1] for b in bares)
    print(f"[bench] samples {args.num_samples}, max_length {args.max_length}, tokens {tokens}")
    print(f"[bench] dump total            {dump_wall:8.2f} s")
    print(f"[bench] bare load + forward   {bare_load + bare_fwd:8.2f} s  ({bare_load:.2f} + {bare_fwd:.2f})")
    print(
        f"[bench] dump / bare                    = {dump_wall / (bare_load + bare_fwd):.3f}  (target <= 1.10)"
    )
    print(f"[bench] target.forward / bare forward  = {dump_fwd / bare_fwd:.3f}")
    if not args.no_interleaved:
        ours, bare = interleaved(params, batches, args.repeats)
        print(
            f"[bench] interleaved per batch: target.forward {ours:.2f}s vs model(...) {bare:.2f}s "
            f"= {ours / bare:.3f}"
        )
    if args.repeats > 1:
        spread = statistics.pstdev(d[0] for d in dumps) / statistics.mean(d[0] for d in dumps)
        print(f"[bench] dump wall spread across rounds: {100 * spread:.1f}% (shared machine noise)")


if __name__ == "__main__":
    main()
