"""`DSparkDraft.draft_block`: batched head matmuls vs one matmul per slot.

A block is sampled left to right because the Markov head makes slot j depend on the token drafted
at slot j-1, but only the Markov bias does: the frozen-head part ``h_j @ W^T`` of every slot is
computed before the loop in one ``[B, H] x [H, V]`` matmul, which reads the ``[V, H]`` head once
per block instead of B times (on CPU, reading weights dominates a draft round). At T = 0 the
Markov biases are computed as a fixed-point iteration over the whole block: each iteration is
one ``[B, r] x [r, V]`` matmul for the guessed previous tokens of all slots, the guesses are
re-derived from the resulting tokens, and the iteration ends when they reproduce themselves
(at most B iterations; the drafted tokens do not depend on the guesses). This script times the
per-slot version (the code before the change, kept below as the reference) against the library's
``draft_block`` on the same contexts, side by side in one run, and checks that both draft the
same tokens (greedy) and distributions (T > 0, same seed).

    OMP_NUM_THREADS=2 python benchmarks/draft_block.py                  # embedded SmolLM2, ~1 min
    python benchmarks/draft_block.py -p params.yaml --drafter runs/default/drafter --blocks 64

Without ``--drafter`` (or when the directory does not exist) an untrained drafter with the
target's dims and ``params.draft`` choices is built. Its Markov bias is tiny, so the first guess
(slot j-1's argmax without its bias) always holds: one iteration, the best case. A trained
drafter's Markov head moves the argmax, which costs iterations; the script prints the mean
number of batched bias calls per block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

MESSAGES = [
    {
        "role": "user",
        "content": "Explain in a few sentences how a hash map resolves collisions, "
        "and compare open addressing with separate chaining. Give one example of each.",
    },
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "-p", "--params", action="append", default=None, help="Params file(s); default params.yaml."
    )
    p.add_argument("--drafter", default=None, help="Exported drafter; default export.output, else untrained.")
    p.add_argument("--blocks", type=int, default=32, help="Blocks drafted per timing pass.")
    p.add_argument("--repeats", type=int, default=3, help="Alternating timing passes of each version.")
    return p.parse_args(argv)


@torch.no_grad()
def draft_block_per_slot(
    model, ctx, ctx_positions, last_token: int, start: int, temperature=0.0, generator=None
):
    """The reference: `draft_block` as it was, lm_head and Markov bias per slot.

    -> (tokens [B], probs [B, V])."""
    from dspark_offline.model.attention_mask import block_attention_mask

    b, dev = model.cfg.block_size, ctx.device
    last = torch.as_tensor(last_token, dtype=torch.int64, device=dev).reshape(1)
    positions = (start + torch.arange(b, device=dev))[None]  # [1, B]
    ids = torch.full((1, b), model.cfg.mask_token_id, dtype=torch.int64, device=dev)
    ids[0, 0] = last[0]
    pos = ctx_positions.to(dev).reshape(1, -1)  # [1, T]
    mask = block_attention_mask(
        torch.tensor([[start]], device=dev),
        torch.ones(1, 1, dtype=torch.bool, device=dev),
        pos.shape[1],
        b,
        ctx_positions=pos,
    )  # [1, B, T+B]
    h = model.backbone(model.embed(ids).to(ctx.dtype), positions, ctx, pos, mask)[0]  # [B, H]
    tokens, probs, prev = [], [], last
    for j in range(b):
        logits = model.block_logits(h[j : j + 1], prev)[0]  # [V]: one [1, H] x [H, V] per slot
        model.confidence_logits(h[j : j + 1], prev)
        if temperature > 0:
            p = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(p, 1, generator=generator)
        else:
            tok = logits.argmax().reshape(1)
            p = torch.zeros_like(logits).scatter_(0, tok, 1.0)
        tokens.append(tok)
        probs.append(p)
        prev = tok
    return torch.cat(tokens), torch.stack(probs)


def compare(
    model, ctx, prompt_ids: list[int], starts: list[int], temperature: float = 0.0, seed: int = 0
) -> dict:
    """Draft a block at every start with both versions: {'same_tokens', 'max_prob_diff'}."""
    ctx_positions = torch.arange(ctx.shape[1])
    same, diff = True, 0.0
    for a in starts:
        g1, g2 = torch.Generator().manual_seed(seed + a), torch.Generator().manual_seed(seed + a)
        ref_tokens, ref_probs = draft_block_per_slot(
            model, ctx, ctx_positions, prompt_ids[a], a, temperature, g1
        )
        new = model.draft_block(ctx, ctx_positions, prompt_ids[a], a, temperature=temperature, generator=g2)
        same &= torch.equal(ref_tokens, new.tokens)
        diff = max(diff, float((ref_probs - new.probs).abs().max()))
    return {"same_tokens": same, "max_prob_diff": diff}


def bias_calls_per_block(model, ctx, prompt_ids: list[int], starts: list[int]) -> float:
    """Mean number of Markov-bias matmuls per greedy block (each reads W2 once; per slot: B)."""
    real, calls = model.markov_head.bias, []
    model.markov_head.bias = lambda prev, rows=None: calls.append(prev.numel()) or real(prev, rows=rows)
    try:
        for a in starts:
            model.draft_block(ctx, torch.arange(ctx.shape[1]), prompt_ids[a], a)
    finally:
        del model.markov_head.bias  # the instance attribute; the method is visible again
    return len(calls) / len(starts)


def _time(fn, starts: list[int]) -> float:
    t0 = time.perf_counter()
    for a in starts:
        fn(a)
    return 1000 * (time.perf_counter() - t0) / len(starts)


def _untrained_drafter(params, target):
    from transformers import AutoTokenizer

    from dspark_offline.model import DraftModelConfig, DSparkDraft
    from dspark_offline.target.layers import default_layer_ids

    c, d = target.model.config, params.draft
    tok = AutoTokenizer.from_pretrained(target.path)
    mask_id = d.mask_token_id if d.mask_token_id is not None else tok.convert_tokens_to_ids(d.mask_token)
    cfg = DraftModelConfig(
        hidden_size=c.hidden_size,
        num_layers=d.num_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size=d.intermediate_size or c.intermediate_size,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
        max_position_embeddings=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        num_target_layers=c.num_hidden_layers,
        target_layer_ids=tuple(default_layer_ids(c.num_hidden_layers, params.dump.num_layer_ids)),
        block_size=d.block_size,
        markov_rank=d.markov_rank,
        markov_head=d.markov_head,
        confidence_head=d.confidence_head,
        mask_token_id=int(mask_id),
    )
    torch.manual_seed(0)
    model = DSparkDraft(cfg).to(target.model.dtype).eval()
    model.set_target_head(target.model.get_input_embeddings(), target.model.get_output_embeddings())
    return model


def main(argv=None) -> None:
    args = parse_args(argv)
    from dspark_offline.cli import build_params
    from dspark_offline.evaluate.drafter import load_drafter
    from dspark_offline.evaluate.target import TargetSession
    from dspark_offline.target.loader import load_target

    params = build_params([Path(p) for p in args.params] if args.params else None, None)
    target = load_target(params.target)
    drafter_dir = Path(args.drafter or params.export.output)
    if (drafter_dir / "config.json").exists():
        model, source = load_drafter(drafter_dir, target.model).model, str(drafter_dir)
    else:
        model, source = _untrained_drafter(params, target), "untrained (params.draft, target dims)"
    cfg = model.cfg
    prompt = torch.tensor(
        target.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    )
    _, states = TargetSession(target.model, list(cfg.target_layer_ids)).forward(prompt)  # [P, L, H]
    with torch.inference_mode():
        ctx = model.context(states[None].to(model.fc.weight.dtype))  # [1, P, H]
    ids = prompt.tolist()
    starts = [len(ids) - 1 - (k % (len(ids) // 2)) for k in range(args.blocks)]
    print(
        f"drafter {source}: H={cfg.hidden_size}, V={cfg.vocab_size}, B={cfg.block_size}, "
        f"markov={cfg.markov_head}, layers={cfg.num_layers}; prompt {len(ids)} tokens, "
        f"{len(starts)} blocks per pass, torch threads {torch.get_num_threads()}"
    )
    greedy, sampled = (
        compare(model, ctx, ids, starts[:8]),
        compare(model, ctx, ids, starts[:8], temperature=1.0),
    )
    print(f"greedy: same tokens {greedy['same_tokens']}, max |probs diff| {greedy['max_prob_diff']:.2e}")
    print(f"T = 1:  same tokens {sampled['same_tokens']}, max |probs diff| {sampled['max_prob_diff']:.2e}")

    if cfg.markov_head:
        print(
            f"Markov biases: {bias_calls_per_block(model, ctx, ids, starts):.2f} batched matmuls "
            f"per greedy block (per slot: {cfg.block_size})"
        )
    pos = torch.arange(ctx.shape[1])
    old = lambda a: draft_block_per_slot(model, ctx, pos, ids[a], a)
    new = lambda a: model.draft_block(ctx, pos, ids[a], a)
    with torch.inference_mode():
        old(starts[0]), new(starts[0])  # warm-up
        t_old, t_new = [], []
        for _ in range(args.repeats):  # alternate, so a noisy neighbour hits both alike
            t_old.append(_time(old, starts))
            t_new.append(_time(new, starts))
    best_old, best_new = min(t_old), min(t_new)
    print(f"per slot (before): {best_old:.1f} ms/block   (passes {', '.join(f'{t:.1f}' for t in t_old)})")
    print(f"batched (now):     {best_new:.1f} ms/block   (passes {', '.join(f'{t:.1f}' for t in t_new)})")
    print(f"speed-up x{best_old / best_new:.2f}")


if __name__ == "__main__":
    main()
