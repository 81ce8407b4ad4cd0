"""Peak memory of one DSpark training step vs num_anchors, chunked vs unchunked logits.

The objective computes logits, softmax and losses in chunks of ``chunk_blocks`` blocks with
activation checkpointing (DESIGN §4.10), so a step's memory should stay flat as
``num_anchors`` grows, while computing all blocks at once grows like num_anchors · B · V.
This script measures it side by side:

- one **fresh subprocess per setting** (``num_anchors`` x ``chunk_blocks``), so peaks never
  leak between settings;
- each child builds the drafter with the target's dims (default: the embedded SmolLM2-135M,
  H=576, V=49152, block 7, Markov rank 256), one sample of ``--seq-len`` supervised tokens,
  then runs forward + backward + AdamW step once on a single block (warm-up: gradients and
  optimizer state allocated) and once measured with all ``num_anchors`` blocks;
- CPU: peak RSS increase of the measured step (``resource.getrusage(RUSAGE_SELF).ru_maxrss``;
  tracemalloc does not see torch's allocator). CUDA: ``torch.cuda.max_memory_allocated``
  increase over the memory held before the step.

"unchunked" means ``chunk_blocks`` >= the number of blocks (one chunk: no bound).

    OMP_NUM_THREADS=1 python benchmarks/train_memory.py                       # CPU, ~2-4 min
    python benchmarks/train_memory.py --device cuda --anchors 64,128,256,512,1024
    python benchmarks/train_memory.py --vocab 8192 --seq-len 512             # quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--anchors", default="64,128,256,512", help="Comma-separated num_anchors values.")
    p.add_argument("--chunk-blocks", type=int, default=32, help="The chunked setting's chunk_blocks.")
    p.add_argument("--seq-len", type=int, default=1024, help="Tokens of the sample (all supervised).")
    p.add_argument("--vocab", type=int, default=49152, help="Vocabulary V (SmolLM2: 49152).")
    p.add_argument("--hidden", type=int, default=576, help="Hidden size H (SmolLM2: 576).")
    p.add_argument("--heads", type=int, default=9, help="Attention heads (SmolLM2: 9, head_dim 64).")
    p.add_argument("--kv-heads", type=int, default=3, help="Key/value heads (SmolLM2: 3).")
    p.add_argument("--intermediate", type=int, default=1536, help="MLP width (SmolLM2: 1536).")
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--markov-rank", type=int, default=256)
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


def child(args: argparse.Namespace, setting: dict) -> dict:
    """One measured training step in this (fresh) process."""
    import torch

    from dspark_offline.config import TrainConfig
    from dspark_offline.model import DraftModelConfig, DSparkDraft, LossConfig, sample_anchors
    from dspark_offline.train.step import local_sums, pooled_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    H, V, S, L = args.hidden, args.vocab, args.seq_len, args.context_layers
    cfg = DraftModelConfig(
        hidden_size=H, num_layers=1, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=H // args.heads, intermediate_size=args.intermediate, rms_norm_eps=1e-5, rope_theta=1e5,
        max_position_embeddings=max(8192, S + args.block_size), vocab_size=V, num_target_layers=30,
        target_layer_ids=tuple(range(1, 1 + L)), block_size=args.block_size, markov_rank=args.markov_rank,
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
    anchors, keep = sample_anchors(batch["loss_mask"].cpu(), batch["lengths"].cpu(), setting["num_anchors"], g)
    anchors, keep = anchors.to(device), keep.to(device)
    # the README's numbers: l1_mode topk
    loss_cfg = LossConfig.from_train(TrainConfig(chunk_blocks=setting["chunk_blocks"], l1_mode="topk"))

    def step(a: torch.Tensor, k: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = pooled_loss(local_sums(model, batch, a, k, loss_cfg), loss_cfg)
        loss.backward()
        opt.step()
        return float(loss)

    # Warm-up with ONE block: gradients and AdamW state exist before the measurement, but the
    # high-water mark (ru_maxrss never goes down) stays far below the measured step's peak.
    step(anchors[:, :1], keep[:, :1])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _peak_bytes(device)
    t0 = time.perf_counter()
    step(anchors, keep)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {**setting, "blocks": int(keep.sum()), "step_peak_mib": (_peak_bytes(device) - before) / 2**20,
            "seconds": seconds}


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(json.dumps(child(args, json.loads(args.child))))
        return
    anchors = [int(a) for a in args.anchors.split(",")]
    unbounded = max(anchors)  # >= every setting's block count: a single chunk
    settings = [{"num_anchors": a, "chunk_blocks": c} for a in anchors for c in (args.chunk_blocks, unbounded)]
    passthrough = sys.argv[1:]
    rows = []
    for s in settings:
        cmd = [sys.executable, __file__, *passthrough, "--child", json.dumps(s)]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"setting {s} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {s} -> {rows[-1]['step_peak_mib']:.0f} MiB", file=sys.stderr, flush=True)

    print(f"\npeak memory of one training step (device {args.device}, S={args.seq_len}, V={args.vocab}, "
          f"H={args.hidden}, B={args.block_size}, Markov rank {args.markov_rank})")
    print(f"{'num_anchors':>11} {'blocks':>6} | {'chunk=' + str(args.chunk_blocks) + ' MiB':>14} {'s':>6} | "
          f"{'unchunked MiB':>14} {'s':>6} | {'unchunked/chunked':>17}")
    by = {(r["num_anchors"], r["chunk_blocks"]): r for r in rows}
    for a in anchors:
        c, u = by[(a, args.chunk_blocks)], by[(a, unbounded)]
        ratio = u["step_peak_mib"] / max(c["step_peak_mib"], 1e-9)
        print(f"{a:>11} {c['blocks']:>6} | {c['step_peak_mib']:>14.0f} {c['seconds']:>6.2f} | "
              f"{u['step_peak_mib']:>14.0f} {u['seconds']:>6.2f} | {ratio:>17.2f}")
    lo, hi = by[(anchors[0], args.chunk_blocks)], by[(anchors[-1], args.chunk_blocks)]
    print(f"chunked peak growth {anchors[0]} -> {anchors[-1]} anchors: "
          f"{hi['step_peak_mib'] / max(lo['step_peak_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
