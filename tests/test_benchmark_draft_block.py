"""benchmarks/draft_block.py: its per-slot reference (the code before the batched lm_head and the
fixed-point Markov biases) and the library's `draft_block` draft the same blocks, also when the
Markov head moves the argmax."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import load_benchmark


def _load_script():
    return load_benchmark("draft_block")


@pytest.mark.parametrize("markov_head", [True, False])
def test_batched_head_drafts_what_the_per_slot_loop_drafted(make_tiny_draft, markov_head):
    bench = _load_script()
    model = make_tiny_draft(markov_head=markov_head, confidence_head=markov_head, block_size=5).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (24,), generator=g).tolist()
    with torch.no_grad():
        ctx = model.context(torch.randn(1, 24, 2, 32, generator=g))  # [1, T, H]
    starts = list(range(4, 24, 3))
    greedy = bench.compare(model, ctx, ids, starts)
    assert greedy == {"same_tokens": True, "max_prob_diff": 0.0}  # one-hot rows of the same argmax
    sampled = bench.compare(model, ctx, ids, starts, temperature=1.0)
    assert sampled["same_tokens"] and sampled["max_prob_diff"] < 1e-5


def test_the_reference_is_really_per_slot(make_tiny_draft):
    """Guard against a reference that silently became the batched code: it calls block_logits
    once per slot with a single row."""
    bench = _load_script()
    model = make_tiny_draft().eval()
    shapes = []
    real = model.block_logits
    model.block_logits = lambda h, prev, vocab=None: shapes.append(tuple(h.shape)) or real(h, prev, vocab)
    with torch.no_grad():
        ctx = model.context(torch.randn(1, 10, 2, 32))
    bench.draft_block_per_slot(model, ctx, torch.arange(10), 3, 9)
    assert shapes == [(1, 32)] * model.cfg.block_size


@pytest.mark.parametrize("markov_scale, expect_iterations", [(1.0, False), (300.0, True)])
def test_greedy_markov_biases_are_a_fixed_point_iteration(make_tiny_draft, markov_scale, expect_iterations):
    """Greedy drafting computes the Markov biases of all slots' guessed previous tokens in one
    [B]-shaped call per iteration, at most B of them. A weak Markov head never moves the argmax
    (one call per block); a strong one does, so blocks take more iterations, and the tokens
    still equal the per-slot loop's."""
    bench = _load_script()
    model = make_tiny_draft(block_size=6).eval()
    with torch.no_grad():
        model.markov_head.markov_w2.weight.mul_(markov_scale)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (30,), generator=g).tolist()
    with torch.no_grad():
        ctx = model.context(torch.randn(1, 30, 2, 32, generator=g))
    starts = list(range(3, 30, 2))
    assert bench.compare(model, ctx, ids, starts)["same_tokens"]
    per_block = bench.bias_calls_per_block(model, ctx, ids, starts)
    assert 1.0 <= per_block <= 6 and (per_block > 1.0) == expect_iterations
    assert "bias" not in vars(model.markov_head)  # the benchmark restored the method
