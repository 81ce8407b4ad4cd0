"""Prompt-lookup decoding: the proposer on hand-made sequences, and end to end through the loop."""

from __future__ import annotations

import random

import pytest
import torch
from test_evaluate_speculative import tiny  # noqa: F401  (module fixture: tiny targets + prompts)

from dspark_offline.evaluate.lossless import check_lossless
from dspark_offline.evaluate.prompt_lookup import PromptLookupDrafter, lookup_continuation
from dspark_offline.evaluate.report import EvalTally
from dspark_offline.evaluate.speculative import speculative_decode
from dspark_offline.evaluate.target import target_decode


def reference_lookup(history: list[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """The rule written the slow, obvious way: all earlier matches of each n, the latest wins."""
    a = len(history) - 1
    for n in range(max_ngram, 0, -1):
        if n > a:
            continue
        tail = history[a - n + 1 :]
        ends = [e for e in range(n - 1, a) if history[e - n + 1 : e + 1] == tail]
        if ends:
            e = max(ends)
            return history[e + 1 : min(e + 1 + max_tokens, a + 1)]
    return []


@pytest.mark.parametrize(
    "history, block, expected",
    [
        # the latest of two 3-gram matches wins; its continuation runs into the end (5 < B tokens)
        ([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3], 7, [8, 5, 1, 2, 3]),
        # a 3-gram match beats a later 2-gram match
        ([1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3], 7, [4, 0, 2, 3, 5, 1, 2]),
        # no 3-gram match: fall back to the 2-gram
        ([7, 2, 3, 4, 9, 2, 3], 7, [4, 9, 2, 3]),
        # no 3- or 2-gram match: fall back to the 1-gram (the latest earlier 5)
        ([5, 6, 5, 7, 8, 5], 7, [7, 8, 5]),
        # no match at all: nothing proposed
        ([1, 2, 3, 4], 7, []),
        ([4], 7, []),
        ([], 7, []),
        # never more than B tokens
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3], 3, [4, 5, 6]),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3], 7, [4, 5, 6, 7, 8, 9, 10]),
        # a match may overlap the tail but must end before the last position
        ([1, 1, 1], 7, [1]),
        ([4, 4], 7, [4]),
        ([6, 1, 1, 1, 1], 7, [1]),
    ],
)
def test_lookup_continuation_hand_made(history, block, expected):
    assert lookup_continuation(history, block) == expected
    assert reference_lookup(history, block) == expected


def test_lookup_continuation_matches_the_reference_rule_on_random_sequences():
    rng = random.Random(0)
    for _ in range(2000):
        history = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        block = rng.randrange(1, 9)
        got = lookup_continuation(history, block)
        assert got == reference_lookup(history, block), (history, block)
        assert len(got) <= block


def test_lookup_max_ngram_and_zero_budget():
    history = [1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3]
    assert lookup_continuation(history, 7, max_ngram=2) == [5, 1, 2, 3]  # latest [2, 3]
    assert lookup_continuation(history, 0) == []


def test_drafter_keeps_the_committed_ids_and_proposes_one_hot_at_temperature():
    d = PromptLookupDrafter(block_size=3, vocab_size=10)
    assert d.layer_ids == []
    d.begin(torch.empty(4, 0, 8), torch.tensor([1, 2, 3, 4]))
    d.extend(torch.empty(2, 0, 8), torch.tensor([1, 2]))  # positions 4, 5
    greedy = d.propose(3, 6, 0.0, None)  # history 1 2 3 4 1 2 | 3
    assert greedy.tokens.tolist() == [4, 1, 2] and greedy.probs is None and greedy.confidence is None
    sampled = d.propose(3, 6, 0.8, None)
    assert sampled.tokens.tolist() == [4, 1, 2]
    assert sampled.probs.shape == (3, 10) and torch.equal(sampled.probs.argmax(-1), sampled.tokens)
    assert torch.equal(sampled.probs.sum(-1), torch.ones(3))
    none = d.propose(9, 6, 0.8, None)
    assert none.tokens.shape == (0,) and none.probs.shape == (0, 10)
    with pytest.raises(RuntimeError, match="holds 6 token ids, the block starts at 7"):
        d.propose(3, 7, 0.0, None)


def test_prompt_lookup_is_lossless_on_tiny_targets(tiny):  # noqa: F811
    model, drafter, prompts, stops, _ = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    pld = PromptLookupDrafter(drafter.block_size, vocab)
    tally = EvalTally(pld.block_size)
    for i, prompt in enumerate(prompts):
        reference = target_decode(model, prompt, 40, stops)
        spec = speculative_decode(model, pld, prompt, max_new_tokens=40, stop_ids=stops)
        check_lossless(i, i, reference, spec.tokens, decoder="prompt_lookup")
        assert all(0 <= r.accepted <= r.proposed <= pld.block_size for r in spec.rounds)
        tally.add_prompt(spec.rounds, len(spec.tokens), 1.0)
    assert tally.proposed > 0, "chat prompts repeat tokens: prompt lookup must propose something"
    assert tally.rounds >= 1 and tally.tau >= 1.0


def simulate_rounds(
    prompt: list[int], continuation: list[int], block: int, max_new: int
) -> list[tuple[int, int]]:
    """(proposed, accepted) of every round, derived from the target's greedy continuation alone:
    at T = 0 the committed sequence is that continuation, so each proposal and its accepted
    prefix are fixed by it. The prefill commits continuation[0]; rounds follow until max_new."""
    seq = prompt + continuation
    a, committed, rounds = len(prompt), 1, []
    while committed < max_new:
        draft = lookup_continuation(seq[: a + 1], block)
        k = 0
        while k < len(draft) and draft[k] == seq[a + 1 + k]:
            k += 1
        rounds.append((len(draft), k))
        a, committed = a + k + 1, committed + k + 1
    return rounds


@pytest.mark.parametrize("max_new", [5, 40])
def test_prompt_lookup_rounds_are_exactly_the_rule(tiny, max_new):  # noqa: F811
    """Every round's proposal length and accepted count equal the rule applied to the target's
    own greedy output: the loop feeds PLD the right history and counts variable-length rounds."""
    model, _, prompts, _, _ = tiny
    block = 4
    vocab = model.get_output_embeddings().weight.shape[0]
    for prompt in prompts:
        longer = target_decode(model, prompt, max_new + block + 1, frozenset())  # covers the last round
        spec = speculative_decode(
            model, PromptLookupDrafter(block, vocab), prompt, max_new_tokens=max_new, stop_ids=frozenset()
        )
        assert spec.tokens == longer[:max_new]
        expected = simulate_rounds(prompt.tolist(), longer, block, max_new)
        assert [(r.proposed, r.accepted) for r in spec.rounds] == expected


def test_prompt_lookup_sampling_is_seeded(tiny):  # noqa: F811
    model, _, prompts, stops, _ = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    runs = [
        speculative_decode(
            model,
            PromptLookupDrafter(4, vocab),
            prompts[3],
            max_new_tokens=16,
            stop_ids=stops,
            temperature=0.8,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert runs[0].tokens == runs[1].tokens and 1 <= len(runs[0].tokens) <= 16
    assert all(r.proposed <= 4 for r in runs[0].rounds)
