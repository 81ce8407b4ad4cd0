"""The target's attention (`target/attention.py`): HF's SDPA values without the KV-head copies."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import load_benchmark

from dspark_offline.target.attention import ATTENTION
from dspark_offline.target.loader import load_model


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen3_dir"])
def target(request):
    model, _ = load_model(request.getfixturevalue(request.param), torch.float32, torch.device("cpu"))
    return model


def test_targets_load_with_our_attention(target):
    assert target.config._attn_implementation == ATTENTION


@pytest.mark.parametrize("batch, new", [(3, 1), (1, 5)])  # a padded decoding step; a verification block
def test_same_logits_as_stock_sdpa(target, batch, new):
    bench = load_benchmark("target_decode")
    try:
        _, stock = bench.step_ms(target, "sdpa", batch, 20, new, repeats=1)
        _, ours = bench.step_ms(target, ATTENTION, batch, 20, new, repeats=1, growing=True)
    finally:
        target.set_attn_implementation(ATTENTION)
    assert stock.shape == ours.shape == (batch, new, target.config.vocab_size)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_benchmark_compares_three_configurations(target):
    m = load_benchmark("target_decode").compare(target, 2, 10, 1, repeats=1)
    assert set(m) == {"stock_ms", "attention_ms", "attention+cache_ms", "max_logit_diff"}
    assert m["max_logit_diff"] < 1e-4 and target.config._attn_implementation == ATTENTION


def test_the_copy_free_path_is_the_one_taken(target, monkeypatch):
    """A masked GQA step on CPU must reach SDPA with `enable_gqa` (not the stock repeat_kv path)."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    load_benchmark("target_decode").step_ms(target, ATTENTION, 2, 10, 1, repeats=1)
    heads, kv_heads = target.config.num_attention_heads, target.config.num_key_value_heads
    assert kv_heads < heads and (heads, kv_heads, True) in seen
