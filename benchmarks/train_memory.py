"""Peak memory and time of one DSpark training step vs num_anchors: deferred vs all-at-once blocks.

A block attends to the context and to itself only, so training defers the drafter's block
states (`DSparkDraft.forward(..., defer_blocks=True)`) and the objective computes them chunk
by chunk of ``chunk_blocks`` blocks together with their logits and losses, each chunk
checkpointed (DESIGN §4.10). A step's memory should then stay flat as ``num_anchors`` grows.
The path before that ("all at once": every block's states in one forward, only the logits
chunked) grows with num_anchors: the decoder layer's activations, among them its attention
scores over the whole context, are kept for every block. This script measures both side by
side in one run:

- one **fresh subprocess per setting** (``num_anchors`` x path), so peaks never leak between
  settings;
- each child builds the drafter with the target's dims (default: the embedded SmolLM2-135M,
  H=576, V=49152, block 7, Markov rank 256; ``--layers`` draft layers, 1 as in params.yaml),
  one sample of ``--seq-len`` supervised tokens, then runs forward + backward + AdamW step once
  on a single block (warm-up: gradients and optimizer state allocated) and ``--repeats`` times
  with all ``num_anchors`` blocks (time: the median; CPU seconds of the process on CPU, wall clock on CUDA);
- CPU: peak RSS increase of the measured steps (``resource.getrusage(RUSAGE_SELF).ru_maxrss``;
  tracemalloc does not see torch's allocator). By default the children run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS at once and the peak is
  that of the live tensors; ``--malloc adaptive`` keeps glibc's default (the RSS then also holds
  freed heap memory that fragmentation keeps from being reused, noisy from run to run).
  ``--memory live`` measures instead the peak of the bytes held by live CPU tensors allocated
  during the measured steps, from torch's own allocation records (``torch.profiler`` with
  ``profile_memory``: every allocation and free, summed in order): the CPU analogue of CUDA's
  ``max_memory_allocated``, independent of glibc (and of the mmap threshold).
  CUDA: ``torch.cuda.max_memory_allocated`` increase over the memory held before the steps.

``--unchunked`` adds a third path: all blocks at once and a single chunk of logits (no bound).

    OMP_NUM_THREADS=1 python benchmarks/train_memory.py                       # CPU, ~3-6 min
    OMP_NUM_THREADS=1 python benchmarks/train_memory.py --memory live         # live tensor bytes
    python benchmarks/train_memory.py --device cuda --anchors 64,128,256,512,1024
    python benchmarks/train_memory.py --vocab 8192 --seq-len 512             # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--anchors", default="64,128,256,512", help="Comma-separated num_anchors values.")
    p.add_argument(
        "--chunk-blocks", type=int, default=32, help="chunk_blocks of the deferred and all-at-once paths."
    )
    p.add_argument("--repeats", type=int, default=2, help="Measured steps per setting (time: their median).")
    p.add_argument(
        "--unchunked", action="store_true", help="Also measure all blocks at once in a single chunk."
    )
    p.add_argument(
        "--malloc",
        choices=("fixed", "adaptive"),
        default="fixed",
        help="CPU: glibc's mmap threshold fixed at 64 KiB (RSS follows the live tensors) or its "
        "adaptive default (RSS also holds freed, fragmented heap).",
    )
    p.add_argument(
        "--memory",
        choices=("rss", "live"),
        default="rss",
        help="CPU: the peak RSS increase, or the peak bytes of live tensors allocated during the "
        "steps (torch.profiler's allocation records). CUDA always: max_memory_allocated.",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="Tokens of the sample (all supervised).")
    p.add_argument("--vocab", type=int, default=49152, help="Vocabulary V (SmolLM2: 49152).")
    p.add_argument("--hidden", type=int, default=576, help="Hidden size H (SmolLM2: 576).")
    p.add_argument("--heads", type=int, default=9, help="Attention heads (SmolLM2: 9, head_dim 64).")
    p.add_argument("--kv-heads", type=int, default=3, help="Key/value heads (SmolLM2: 3).")
    p.add_argument("--intermediate", type=int, default=1536, help="MLP width (SmolLM2: 1536).")
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--markov-rank", type=int, default=256)
    p.add_argument("--layers", type=int, default=1, help="Draft decoder layers (params.yaml: 1).")
    p.add_argument("--context-layers", type=int, default=5, help="Target layer states L.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON of one setting
    return p.parse_args(argv)


def _peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def live_peak_bytes(events) -> int:
    """Peak of the running sum of torch's CPU allocation records (+bytes allocated, -bytes freed)
    in time order: the most bytes that tensors allocated inside the profiled region held at once
    (tensors that existed before it are not counted, as CUDA's peak minus what was held before)."""
    from torch.autograd import DeviceType

    mem = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in mem:
        held += nbytes
        peak = max(peak, held)
    return peak


def child(args: argparse.Namespace, setting: dict) -> dict:
    """One measured training step in this (fresh) process."""
    from contextlib import nullcontext

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dspark_offline.config import TrainConfig
    from dspark_offline.model import (
        DraftModelConfig,
        DSparkDraft,
        LossConfig,
        block_targets,
        dspark_loss,
        sample_anchors,
    )
    from dspark_offline.train.step import local_sums, pooled_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    H, V, S, L = args.hidden, args.vocab, args.seq_len, args.context_layers
    cfg = DraftModelConfig(
        hidden_size=H,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=H // args.heads,
        intermediate_size=args.intermediate,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        max_position_embeddings=max(8192, S + args.block_size),
        vocab_size=V,
        num_target_layers=30,
        target_layer_ids=tuple(range(1, 1 + L)),
        block_size=args.block_size,
        markov_rank=args.markov_rank,
        mask_token_id=V - 1,
    )
    model = DSparkDraft(cfg).to(device)
    model.set_target_head(torch.randn(V, H) * 0.02, torch.randn(V, H) * 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    K = 64
    batch = {
        "input_ids": torch.randint(0, V - 1, (1, S), device=device),  # [1, S]
        "loss_mask": torch.ones(1, S, dtype=torch.bool, device=device),  # [1, S]
        "lengths": torch.tensor([S], device=device),  # [1]
        "hidden": torch.randn(1, S, L, H, device=device),  # [1, S, L, H]
        "topk_ids": torch.randint(0, V, (1, S, K), device=device),  # [1, S, K]
        "topk_probs": torch.softmax(torch.randn(1, S, K, device=device), -1) * 0.9,  # [1, S, K]
        "final_hidden": None,
    }
    g = torch.Generator().manual_seed(0)
    anchors, keep = sample_anchors(
        batch["loss_mask"].cpu(), batch["lengths"].cpu(), setting["num_anchors"], g
    )
    anchors, keep = anchors.to(device), keep.to(device)
    # the README's numbers: l1_mode topk
    loss_cfg = LossConfig.from_train(TrainConfig(chunk_blocks=setting["chunk_blocks"], l1_mode="topk"))

    def sums(a: torch.Tensor, k: torch.Tensor):
        if setting["path"] == "deferred":  # what training runs (train/step.py)
            return local_sums(model, batch, a, k, loss_cfg)
        # every block's states in one forward, then the chunked objective selects them
        targets = block_targets(batch, a, k, cfg.block_size, loss_cfg.gamma, loss_cfg.l1_mode)
        return dspark_loss(model, model(batch["input_ids"], batch["hidden"], a, k), targets, loss_cfg)

    def step(a: torch.Tensor, k: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = pooled_loss(sums(a, k), loss_cfg)
        loss.backward()
        opt.step()
        return loss.item()

    # Warm-up with ONE block: gradients and AdamW state exist before the measurement, but the
    # high-water mark (ru_maxrss never goes down) stays far below the measured step's peak.
    step(anchors[:, :1], keep[:, :1])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _peak_bytes(device)
    # CPU: the process's CPU time, which other processes on a shared machine barely disturb (one
    # thread: OMP_NUM_THREADS=1 is the documented way to run this); CUDA: wall clock
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    live = device.type == "cpu" and args.memory == "live"
    # --memory live records every allocation and free of the measured steps (slower: time is not comparable)
    recorder = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if live else nullcontext()
    seconds, losses = [], []
    with recorder:
        for _ in range(args.repeats):
            t0 = clock()
            losses.append(step(anchors, keep))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(clock() - t0)
    if live:
        peak = live_peak_bytes(recorder.profiler.kineto_results.events())
    else:
        peak = _peak_bytes(device) - before
    return {
        **setting,
        "blocks": int(keep.sum()),
        "step_peak_mib": peak / 2**20,
        "seconds": statistics.median(seconds),
        "loss": losses[0],
    }


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(json.dumps(child(args, json.loads(args.child))))
        return
    anchors = [int(a) for a in args.anchors.split(",")]
    paths = {"deferred": args.chunk_blocks, "at_once": args.chunk_blocks}
    if args.unchunked:
        paths["unchunked"] = max(anchors)  # >= every setting's block count: a single chunk
    settings = [{"num_anchors": a, "path": p, "chunk_blocks": c} for a in anchors for p, c in paths.items()]
    passthrough = sys.argv[1:]
    # A fixed mmap threshold: glibc then returns every freed tensor of 64 KiB or more to the OS at
    # once, so the RSS peak follows the live tensors. With its adaptive default, tensors up to
    # 32 MiB come from the heap, whose freed and fragmented parts the RSS keeps: it then also
    # measures fragmentation, and the same setting reads 57 or 75 MiB from run to run.
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    rows = []
    for s in settings:
        cmd = [sys.executable, __file__, *passthrough, "--child", json.dumps(s)]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"setting {s} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"  measured {s} -> {rows[-1]['step_peak_mib']:.0f} MiB, {rows[-1]['seconds']:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    by = {(r["num_anchors"], r["path"]): r for r in rows}
    live = args.memory == "live" and args.device == "cpu"
    measure = "live tensor bytes (profiler; slows the step)" if live else f"malloc {args.malloc}"
    print(
        f"\npeak memory and time of one training step (device {args.device}, S={args.seq_len}, "
        f"V={args.vocab}, H={args.hidden}, B={args.block_size}, Markov rank {args.markov_rank}, "
        f"{args.layers} draft layer(s), chunk_blocks {args.chunk_blocks}, "
        f"{measure}; "
        f"s = {'wall' if args.device.startswith('cuda') else 'CPU'} seconds of the step, "
        f"median of {args.repeats})"
    )
    extra = f" | {'unchunked MiB':>13} {'s':>6}" if args.unchunked else ""
    print(
        f"{'num_anchors':>11} {'blocks':>6} | {'deferred MiB':>12} {'s':>6} | {'at once MiB':>11} {'s':>6} | "
        f"{'at once/deferred MiB':>20} {'s':>5}{extra}"
    )
    for a in anchors:
        d, o = by[(a, "deferred")], by[(a, "at_once")]
        line = (
            f"{a:>11} {d['blocks']:>6} | {d['step_peak_mib']:>12.0f} {d['seconds']:>6.2f} | "
            f"{o['step_peak_mib']:>11.0f} {o['seconds']:>6.2f} | "
            f"{o['step_peak_mib'] / max(d['step_peak_mib'], 1e-9):>20.2f} {o['seconds'] / d['seconds']:>5.2f}"
        )
        if args.unchunked:
            u = by[(a, "unchunked")]
            line += f" | {u['step_peak_mib']:>13.0f} {u['seconds']:>6.2f}"
        print(line)
        if abs(d["loss"] - o["loss"]) > 1e-5 * abs(o["loss"]):  # the same objective on both paths
            raise SystemExit(f"num_anchors {a}: deferred loss {d['loss']} != all-at-once loss {o['loss']}")
    for p in paths:
        lo, hi = by[(anchors[0], p)], by[(anchors[-1], p)]
        print(
            f"{p:>9} peak growth {anchors[0]} -> {anchors[-1]} anchors: "
            f"{hi['step_peak_mib'] / max(lo['step_peak_mib'], 1e-9):.2f}x"
        )


if __name__ == "__main__":
    main()
