"""Why the held-out `tau_greedy` of training is higher than the τ `evaluate` decodes.

Training's validation scores a block at every sampled answer position and averages over
positions; speculative decoding visits only the positions where a round starts (after a long
acceptance it skips the positions it committed), so its τ = committed tokens / rounds weighs
each stretch of the answer by its number of rounds, not its length. Easy stretches (a repeated
phrase) count less there.

This script takes the target's own greedy answer to each held-out prompt (`evaluate`'s
prompts and budget), runs the target once over prompt + answer (full prefill, the states a dump
would store) and drafts one block with the exported drafter at every answer position a, the way
decoding drafts it (`DSparkDraft.draft_block`, context = positions < a). Printed:

- **position average**: mean over all answer positions of 1 + the leading drafted tokens that
  equal the answer (what `tau_greedy` in `metrics/val.tsv` measures, on the eval prompts);
- **simulated decoding**: walk each answer from its first position, jumping by that position's
  acceptance, and divide tokens by rounds (what greedy speculative decoding would commit, if
  drafting from full-prefill states equals drafting in the decoding loop);
- with ``--eval-json``, the τ that `evaluate` decoded (`eval.json`): simulated and decoded τ
  agree when the serving path and the teacher-forced path agree.

    OMP_NUM_THREADS=2 python benchmarks/tau_positions.py --eval-json runs/default/eval.json   # ~6 min
"""

from __future__ import annotations

import argparse
import json

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "-p", "--params", action="append", default=None, help="Params file(s); default params.yaml."
    )
    p.add_argument(
        "--drafter", default=None, help="Exported drafter; default evaluate.drafter / export.output."
    )
    p.add_argument("--num-prompts", type=int, default=None, help="Default evaluate.num_prompts.")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Default evaluate.max_new_tokens.")
    p.add_argument(
        "--eval-json", default=None, help="An eval.json of the same drafter, to print its τ beside."
    )
    return p.parse_args(argv)


def acceptances(drafter, seq: torch.Tensor, prompt_len: int, states: torch.Tensor) -> list[int]:
    """1 + leading matches of the block drafted at each answer position a (prompt_len <= a < N-1)."""
    ctx = drafter._project(states)  # [1, N, H]
    taus = []
    for a in range(prompt_len, len(seq) - 1):
        block = drafter.model.draft_block(ctx[:, :a], torch.arange(a), int(seq[a]), a)
        k = 0
        for tok in block.tokens.tolist():
            if a + 1 + k >= len(seq) or tok != int(seq[a + 1 + k]):
                break
            k += 1
        taus.append(1 + k)
    return taus


def simulated_rounds(taus: list[int]) -> int:
    """Rounds greedy decoding takes over the answer when a round at offset i commits taus[i]."""
    i, rounds = 0, 0
    while i < len(taus):
        rounds += 1
        i += taus[i]
    return rounds


@torch.inference_mode()
def main(argv=None) -> None:
    args = parse_args(argv)
    from dspark_offline.config import load_params
    from dspark_offline.evaluate.drafter import load_drafter
    from dspark_offline.evaluate.prompts import load_prompts
    from dspark_offline.evaluate.target import TargetSession, target_decode
    from dspark_offline.target.loader import load_target

    params = load_params(args.params or "params.yaml")
    cfg = params.evaluate
    num_prompts = args.num_prompts or cfg.num_prompts
    max_new = args.max_new_tokens or cfg.max_new_tokens
    target = load_target(params.target)
    drafter = load_drafter(args.drafter or cfg.drafter or params.export.output, target.model)
    prompts, _ = load_prompts(params.prepare.output, num_prompts)
    positions, accepted, rounds = 0, 0, 0  # answer positions after the first = tokens the rounds commit
    for prompt in prompts:
        answer = target_decode(target.model, prompt.ids, max_new, target.stop_ids)
        seq = torch.cat([prompt.ids, torch.tensor(answer, dtype=torch.int64)])
        _, states = TargetSession(target.model, drafter.layer_ids).forward(seq)  # [N, L, H]
        taus = acceptances(drafter, seq, len(prompt.ids), states)
        positions += len(taus)
        accepted += sum(taus)
        rounds += simulated_rounds(taus)
        print(
            f"prompt {prompt.index}: {len(taus)} positions, running position average "
            f"{accepted / max(positions, 1):.3f}",
            flush=True,
        )
    print(f"\n{len(prompts)} prompts, {positions} answer positions")
    print(f"position average (tau_greedy's weighting) : {accepted / positions:.4f}")
    print(f"simulated decoding (tokens / rounds)       : {positions / rounds:.4f}")
    if args.eval_json:
        with open(args.eval_json) as f:
            print(f"decoded by evaluate ({args.eval_json})  : {json.load(f)['tau']:.4f}")


if __name__ == "__main__":
    main()
