"""Vocabulary-sized products: ``x @ W.T`` (torch's ``linear``) vs ``dspark_offline.linalg.vocab_logits``.

Every decoding step multiplies a few rows by a [V, H] weight: the drafter's frozen head and Markov
bias (7 rows per block), the target's head while verifying a block (8 rows) or generating in a
batch (16 rows). This script times both layouts on the same tensors, alternating, for decoding
shapes and for training-chunk shapes, in fp32 and bf16, and prints the ratio and the largest
difference of the results.

    OMP_NUM_THREADS=2 python benchmarks/vocab_matmul.py            # SmolLM2 sizes, ~1 min
    python benchmarks/vocab_matmul.py --vocab 151936 --hidden 4096  # Qwen3-8B's head
"""

from __future__ import annotations

import argparse
import time

import torch

from dspark_offline.linalg import vocab_logits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49,152).")
    p.add_argument("--hidden", type=int, default=576, help="H of the head (SmolLM2: 576).")
    p.add_argument("--rank", type=int, default=256, help="Markov rank r (a second [V, r] product).")
    p.add_argument("--rows", default="1,7,8,16,448", help="Row counts of x, comma-separated.")
    p.add_argument("--repeats", type=int, default=10, help="Timed calls per layout and shape.")
    return p.parse_args(argv)


def _ms(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def measure(vocab: int, width: int, rows: int, dtype: torch.dtype, repeats: int) -> dict:
    """Time ``linear`` and ``vocab_logits`` on x [rows, width] and W [vocab, width], alternating."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, width, generator=g).to(dtype)
    x = torch.randn(rows, width, generator=g).to(dtype)
    plain, ours = [], []
    for _ in range(2):  # alternate so a drifting machine affects both
        plain.append(_ms(lambda: torch.nn.functional.linear(x, weight), repeats))
        ours.append(_ms(lambda: vocab_logits(x, weight), repeats))
    diff = (torch.nn.functional.linear(x, weight).float() - vocab_logits(x, weight).float()).abs().max()
    return {"linear_ms": min(plain), "vocab_logits_ms": min(ours), "max_abs_diff": float(diff)}


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; V = {args.vocab}")
    print("| weight | rows | dtype | x @ W.T ms | vocab_logits ms | speed-up | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for width in (args.hidden, args.rank):
        for dtype in (torch.float32, torch.bfloat16):
            for r in rows:
                m = measure(args.vocab, width, r, dtype, args.repeats)
                print(
                    f"| [{args.vocab}, {width}] | {r} | {str(dtype).removeprefix('torch.')} | "
                    f"{m['linear_ms']:.2f} | {m['vocab_logits_ms']:.2f} | "
                    f"{m['linear_ms'] / m['vocab_logits_ms']:.2f}x | {m['max_abs_diff']:.1e} |"
                )


if __name__ == "__main__":
    main()
