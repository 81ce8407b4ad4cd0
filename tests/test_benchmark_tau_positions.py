"""benchmarks/tau_positions.py: its per-position acceptances, walked round by round, give the rounds
the real decoding loop takes (a planted drafter, right up to a slot that varies with the position)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from benchmark_script import load_benchmark
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_offline.evaluate.proposal import Proposal
from dspark_offline.evaluate.speculative import speculative_decode
from dspark_offline.evaluate.target import TargetSession, target_decode
from dspark_offline.target.loader import stop_token_ids

BLOCK = 4


class Planted:
    """Drafts the reference continuation, wrong from slot (a % (BLOCK + 1)) on, through both the
    decoding loop's interface and the one the benchmark calls (`_project`, `model.draft_block`)."""

    block_size, layer_ids = BLOCK, [0, 1]

    def __init__(self, seq: list[int]):
        self.seq = seq
        self.model = SimpleNamespace(draft_block=self._block)

    def _tokens(self, a: int) -> torch.Tensor:
        wrong_from = a % (BLOCK + 1)
        toks = [self.seq[a + 1 + j] if a + 1 + j < len(self.seq) else 0 for j in range(BLOCK)]
        return torch.tensor([t if j < wrong_from else (t + 1) % 50 for j, t in enumerate(toks)])

    def _project(self, states):
        return states[None]

    def _block(self, ctx, ctx_positions, last_token, a):
        assert ctx.shape[1] == a == len(ctx_positions) and last_token == self.seq[a]
        return SimpleNamespace(tokens=self._tokens(a))

    def begin(self, states, ids):
        pass

    def extend(self, states, ids):
        pass

    def propose(self, last_token, position, temperature, generator):
        return Proposal(self._tokens(position), None, None)


def test_walked_acceptances_equal_the_decoding_rounds(tiny_qwen3_dir):
    bench = load_benchmark("tau_positions")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    stops = stop_token_ids(model, tok)
    prompt = torch.tensor(
        tok.apply_chat_template(
            [{"role": "user", "content": "Count to ten."}], add_generation_prompt=True, return_dict=False
        )
    )
    answer = target_decode(model, prompt, 40, stops)
    seq = torch.cat([prompt, torch.tensor(answer)])
    drafter = Planted(seq.tolist())
    _, states = TargetSession(model, drafter.layer_ids).forward(seq)
    taus = bench.acceptances(drafter, seq, len(prompt), states)
    assert len(taus) == len(answer) - 1 and set(taus) == set(range(1, BLOCK + 2))

    spec = speculative_decode(model, drafter, prompt, max_new_tokens=40, stop_ids=stops)
    assert spec.tokens == answer
    assert len(spec.rounds) == bench.simulated_rounds(taus)
    offset = 0
    for r in spec.rounds:  # every round commits what the position it starts at was scored
        assert r.accepted + 1 == taus[offset] or offset + r.accepted + 1 >= len(taus)
        offset += r.accepted + 1


def test_simulated_rounds_jump_by_acceptance():
    bench = load_benchmark("tau_positions")
    assert bench.simulated_rounds([2, 1, 3, 1, 1, 1]) == 3  # offsets 0, 2, 5
    assert bench.simulated_rounds([1, 1, 1]) == 3
    assert bench.simulated_rounds([]) == 0
