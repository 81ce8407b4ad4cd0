"""The target's attention: HF's stock "sdpa" vs ours (`dspark_offline.target.attention`), side by side.

Stock SDPA copies every key/value head `num_key_value_groups` times whenever a mask is passed;
ours lets CPU SDPA read the grouped heads directly (`enable_gqa`). This script runs, on the same
target and inputs, alternating between the two implementations:

- a batched decoding step (what `generate` does: left-padded batch, KV cache, one new token),
- a verification step (what `evaluate` does: one sequence, KV cache, a block of new tokens),

and prints ms per step, the speed-up and the largest logit difference.

    OMP_NUM_THREADS=2 python benchmarks/target_attention.py            # embedded SmolLM2, ~1 min
    python benchmarks/target_attention.py --batch 32 --context 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("-p", "--params", action="append", default=None, help="Params file(s); default params.yaml.")
    p.add_argument("--batch", type=int, default=16, help="Rows of the decoding step (generate.batch_size).")
    p.add_argument("--context", type=int, default=512, help="Cached tokens before the timed step.")
    p.add_argument("--block", type=int, default=8, help="New tokens of the verification step (block + 1).")
    p.add_argument("--repeats", type=int, default=5, help="Timed steps per implementation and pass.")
    return p.parse_args(argv)


@torch.inference_mode()
def step_ms(model, implementation: str, batch: int, context: int, new: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Fill a KV cache with ``context`` tokens per row (the first rows left-padded by a few tokens), then
    time forwards of ``new`` tokens over it. -> (ms per step, logits of the last step)."""
    model.set_attn_implementation(implementation)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (batch, context + new), generator=g)
    mask = torch.ones(batch, context + new, dtype=torch.int64)
    mask[: batch // 2, :7] = 0  # some padding, as in a length-sorted batch
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :context], attention_mask=mask[:, :context], position_ids=positions[:, :context],
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    times, logits = [], None
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        logits = model(input_ids=ids[:, context:], attention_mask=mask, position_ids=positions[:, context:],
                       past_key_values=cache, use_cache=True).logits
        times.append(time.perf_counter() - t0)
        cache.crop(-new)  # transformers 5.x: minus the count to drop
    return min(times[1:]) * 1e3, logits.float()


def compare(model, batch: int, context: int, new: int, repeats: int) -> dict:
    from dspark_offline.target.attention import ATTENTION

    stock, ours = [], []
    for _ in range(2):  # alternate so a drifting machine affects both
        ms, ref = step_ms(model, "sdpa", batch, context, new, repeats)
        stock.append(ms)
        ms, got = step_ms(model, ATTENTION, batch, context, new, repeats)
        ours.append(ms)
    return {"stock_ms": min(stock), "ours_ms": min(ours), "max_logit_diff": float((ref - got).abs().max())}


def main(argv=None) -> None:
    from dspark_offline.cli import build_params
    from dspark_offline.target.hf_backend import load_target

    args = parse_args(argv)
    target = load_target(build_params(args.params, None).target)
    cfg = target.model.config
    print(f"target {target.path.name}: {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads; "
          f"{torch.get_num_threads()} threads")
    print("| step | stock sdpa ms | ours ms | speed-up | max logit diff |")
    print("| --- | --- | --- | --- | --- |")
    for name, batch, new in (
        (f"decode: {args.batch} rows x 1 token", args.batch, 1),
        (f"verify: 1 row x {args.block} tokens", 1, args.block),
    ):
        m = compare(target.model, batch, args.context, new, args.repeats)
        print(f"| {name}, {args.context} cached | {m['stock_ms']:.1f} | {m['ours_ms']:.1f} | "
              f"{m['stock_ms'] / m['ours_ms']:.2f}x | {m['max_logit_diff']:.1e} |")


if __name__ == "__main__":
    main()
