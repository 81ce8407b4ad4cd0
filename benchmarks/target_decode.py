"""Target decoding steps: HF's stock SDPA and DynamicCache vs ours, side by side.

Stock SDPA copies every key/value head `num_key_value_groups` times whenever a mask is passed;
ours lets CPU SDPA read the grouped heads directly (`target/attention.py`). DynamicCache copies
the whole cache at every step (``torch.cat``); ours grows by doubling (`target/kv_cache.py`).
This script runs, on the same target and inputs, alternating between the configurations:

- a batched decoding step (what `generate` does: left-padded batch, KV cache, one new token),
- a verification step (what `evaluate` does: one sequence, KV cache, a block of new tokens),

and prints ms per step, the speed-up and the largest logit difference.

    OMP_NUM_THREADS=2 python benchmarks/target_decode.py            # embedded SmolLM2, ~1 min
    python benchmarks/target_decode.py --batch 32 --context 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "-p", "--params", action="append", default=None, help="Params file(s); default params.yaml."
    )
    p.add_argument("--batch", type=int, default=16, help="Rows of the decoding step (generate.batch_size).")
    p.add_argument("--context", type=int, default=512, help="Cached tokens before the timed step.")
    p.add_argument("--block", type=int, default=8, help="New tokens of the verification step (block + 1).")
    p.add_argument("--repeats", type=int, default=5, help="Timed steps per implementation and pass.")
    return p.parse_args(argv)


@torch.inference_mode()
def step_ms(
    model, implementation: str, batch: int, context: int, new: int, repeats: int, growing: bool = False
) -> tuple[float, torch.Tensor]:
    """Fill a KV cache with ``context`` tokens per row (the first rows left-padded by a few tokens), then
    time forwards of ``new`` tokens over it. -> (ms per step, logits of the last step)."""
    from dspark_offline.target.kv_cache import growing_cache

    model.set_attn_implementation(implementation)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (batch, context + new), generator=g)
    mask = torch.ones(batch, context + new, dtype=torch.int64)
    mask[: batch // 2, :7] = 0  # some padding, as in a length-sorted batch
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = growing_cache(model) if growing else DynamicCache(config=model.config)
    model(
        input_ids=ids[:, :context],
        attention_mask=mask[:, :context],
        position_ids=positions[:, :context],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    times, logits = [], None
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        logits = model(
            input_ids=ids[:, context:],
            attention_mask=mask,
            position_ids=positions[:, context:],
            past_key_values=cache,
            use_cache=True,
        ).logits
        times.append(time.perf_counter() - t0)
        cache.crop(-new)  # transformers 5.x: minus the count to drop
    return min(times[1:]) * 1e3, logits.float()


def compare(model, batch: int, context: int, new: int, repeats: int) -> dict:
    """ms per step of each configuration (best of two alternating passes) and the largest logit
    difference from the stock one."""
    from dspark_offline.target.attention import ATTENTION

    configs = {
        "stock": ("sdpa", False),
        "attention": (ATTENTION, False),
        "attention+cache": (ATTENTION, True),
    }
    ms = {name: [] for name in configs}
    diff = 0.0
    for _ in range(2):  # alternate so a drifting machine affects all
        ref = None
        for name, (impl, growing) in configs.items():
            t, logits = step_ms(model, impl, batch, context, new, repeats, growing)
            ms[name].append(t)
            ref = logits if ref is None else ref
            diff = max(diff, float((logits - ref).abs().max()))
    model.set_attn_implementation(ATTENTION)
    return {**{f"{name}_ms": min(v) for name, v in ms.items()}, "max_logit_diff": diff}


def main(argv=None) -> None:
    from dspark_offline.cli import build_params
    from dspark_offline.target.loader import load_target

    args = parse_args(argv)
    target = load_target(build_params(args.params, None).target)
    cfg = target.model.config
    print(
        f"target {target.path.name}: {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads; "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| step | stock (sdpa, DynamicCache) ms | our attention ms | + growing cache ms | speed-up "
        "| max logit diff |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, batch, new in (
        (f"decode: {args.batch} rows x 1 token", args.batch, 1),
        (f"verify: 1 row x {args.block} tokens", 1, args.block),
    ):
        m = compare(target.model, batch, args.context, new, args.repeats)
        print(
            f"| {name}, {args.context} cached | {m['stock_ms']:.1f} | {m['attention_ms']:.1f} | "
            f"{m['attention+cache_ms']:.1f} | {m['stock_ms'] / m['attention+cache_ms']:.2f}x | "
            f"{m['max_logit_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
