"""Generate throughput: our row-dropping batched decode vs HF ``model.generate`` with left padding,
side by side in one run, on the same first-turn prompts of a prepared data set.

What is compared (same model, same prompts sorted by length, same batch size, greedy):

- **ours**: ``dspark_offline.generate.decode.decode_batch`` -- left-padded prefill, then one
  step per token for the rows still going; finished rows leave the batch and the KV cache.
- **hf**: ``model.generate(input_ids, attention_mask, max_new_tokens, do_sample=False)`` on the
  same left-padded batch; rows that stopped keep being computed until the longest one ends.

Useful tokens/s counts only the tokens kept (up to and including the stop token) for both.
At T = 0 both must give the same tokens; the number of prompts whose outputs differ is printed
(expected 0; a near-tie under a different batch shape could flip one). ``--check-single N``
also decodes N prompts one at a time with `evaluate.target.target_decode` (the losslessness
reference) and compares them with the batched tokens.

The rounds alternate ours / hf for each batch size (``--batch-sizes``), so load drift on a shared
machine hits both; tokens per CPU-second (process time) is printed beside wall-clock tokens/s
because on a shared machine the wall clock measures the neighbours too (with one thread, tokens
per CPU-second approximates an unloaded core). Prompts come from ``--prepared`` (a prepare
output; its train split).

CPU: ``OMP_NUM_THREADS=2 python benchmarks/generate_throughput.py --prepared data/prepared
--num-prompts 64 --max-new-tokens 128 --batch-sizes 16 32`` (several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "--prepared", default="data/prepared", help="Prepared-data directory (train split is used)."
    )
    p.add_argument("--target", default="embedded:smollm2", help="Target path or 'embedded:smollm2'.")
    p.add_argument("--num-prompts", type=int, default=64, help="First-turn prompts to answer.")
    p.add_argument("--max-new-tokens", type=int, default=128, help="Answer tokens per prompt at most.")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help="Batch sizes to compare.")
    p.add_argument("--skip-hf", action="store_true", help="Only time our decode.")
    p.add_argument(
        "--check-single",
        type=int,
        default=0,
        help="Also decode this many prompts one at a time (evaluate's target_decode) and count "
        "those whose tokens differ from the batched decode of the first batch size.",
    )
    return p.parse_args()


def main() -> None:
    import numpy as np
    import torch

    from dspark_offline.config import TargetConfig
    from dspark_offline.data.prepared import PreparedSplit
    from dspark_offline.data.prompts import prompt_from_sample
    from dspark_offline.evaluate.target import target_decode
    from dspark_offline.generate.decode import decode_batch
    from dspark_offline.generate.stops import resolve_stop_ids
    from dspark_offline.target.loader import load_target

    args = parse_args()
    target = load_target(TargetConfig(path=args.target))
    model, tok = target.model, target.tokenizer
    stops = resolve_stop_ids(target.stop_ids, tok, [], model.get_output_embeddings().weight.shape[0]).all
    split = PreparedSplit.load(args.prepared, "train")
    prompts = []
    for i in range(len(split)):
        p = prompt_from_sample(*split[i])
        if p is not None:
            prompts.append(torch.from_numpy(p.astype(np.int64)))
        if len(prompts) == args.num_prompts:
            break
    prompts.sort(key=len, reverse=True)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else min(stops))
    lens = [len(p) for p in prompts]
    print(
        f"{len(prompts)} prompts, {sum(lens)} prompt tokens "
        f"(median {int(np.median(lens))}, max {max(lens)}); max_new_tokens {args.max_new_tokens}; "
        f"threads {torch.get_num_threads()}; stop ids {sorted(stops)}"
    )

    def ours(batch):
        return decode_batch(model, batch, [args.max_new_tokens] * len(batch), stops, pad)

    @torch.inference_mode()
    def hf(batch):
        P = max(len(p) for p in batch)
        ids = torch.full((len(batch), P), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(batch):
            ids[b, P - len(p) :], mask[b, P - len(p) :] = p, 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=pad,
        )
        res = []
        for row in out[:, P:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            res.append(row[:cut])
        return res

    ours(prompts[:2])  # warm-up
    first = None
    for bs in args.batch_sizes:
        results = {}
        for name, fn in [("ours", ours)] + ([] if args.skip_hf else [("hf", hf)]):
            t0, c0 = time.perf_counter(), time.process_time()
            outs = []
            for k in range(0, len(prompts), bs):
                outs += fn(prompts[k : k + bs])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = sum(len(o) for o in outs)
            results[name] = (outs, n, dt)
            first = outs if first is None else first
            print(
                f"batch {bs:3d} {name:4s}: {n} useful tokens in {dt:6.1f}s wall = {n / dt:6.1f} tok/s; "
                f"{cpu:6.1f} CPU-s = {n / cpu:6.1f} tok per CPU-s"
            )
        if "hf" in results:
            diff = sum(a != b for a, b in zip(results["ours"][0], results["hf"][0]))
            speedup = (results["ours"][1] / results["ours"][2]) / (results["hf"][1] / results["hf"][2])
            print(
                f"batch {bs:3d}: ours / hf = x{speedup:.2f} tokens/s; prompts with different outputs: {diff}"
            )
    if args.check_single:
        t0, n = time.perf_counter(), 0
        diff = 0
        for p, got in list(zip(prompts, first))[: args.check_single]:
            ref = target_decode(model, p, args.max_new_tokens, stops)
            diff += ref != got
            n += len(ref)
        dt = time.perf_counter() - t0
        print(
            f"one sequence at a time: {n} tokens in {dt:.1f}s = {n / dt:.1f} tok/s; "
            f"{diff} of {args.check_single} prompts differ from batch {args.batch_sizes[0]}"
        )


if __name__ == "__main__":
    main()
