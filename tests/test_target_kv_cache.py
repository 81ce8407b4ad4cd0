"""`GrowingLayer` caches: the values of transformers' DynamicCache, without a copy per step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dspark_offline.generate.decode import decode_batch
from dspark_offline.target.kv_cache import MIN_CAPACITY, GrowingLayer, growing_cache
from dspark_offline.target.loader import load_model


@pytest.fixture(scope="module")
def target(tiny_qwen3_dir):
    return load_model(tiny_qwen3_dir, torch.float32, torch.device("cpu"))[0]


@torch.inference_mode()
def _steps(model, cache, ids, crop_every=0):
    """Prefill 12 tokens, then one token at a time; every `crop_every` steps drop the last 2."""
    out = [model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True).logits]
    pos = 12
    for i in range(12, ids.shape[1]):
        out.append(
            model(
                input_ids=ids[:, i : i + 1],
                position_ids=torch.tensor([[pos]] * ids.shape[0]),
                past_key_values=cache,
                use_cache=True,
            ).logits
        )
        pos += 1
        if crop_every and i % crop_every == 0:
            cache.crop(-2)
            pos -= 2
    return torch.cat(out, dim=1), cache.get_seq_length()


@pytest.mark.parametrize("crop_every", [0, 5])
def test_growing_cache_equals_dynamic_cache(target, crop_every):
    ids = torch.randint(5, 500, (2, 12 + 2 * MIN_CAPACITY))  # crosses a capacity doubling, also when cropping
    ref, ref_len = _steps(target, DynamicCache(config=target.config), ids, crop_every)
    cache = growing_cache(target)
    got, got_len = _steps(target, cache, ids, crop_every)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert got_len == ref_len > MIN_CAPACITY and cache.layers[0]._k.shape[-2] >= 2 * MIN_CAPACITY
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_batch_select_keeps_the_chosen_rows(target):
    cache = growing_cache(target)
    ids = torch.randint(5, 500, (3, 20))
    with torch.inference_mode():
        target(input_ids=ids, past_key_values=cache, use_cache=True)
        before = [layer.keys.clone() for layer in cache.layers]
        cache.batch_select_indices(torch.tensor([2, 0]))
    for layer, keys in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys[[2, 0]]) and cache.get_seq_length() == 20


def test_batched_decode_still_matches_one_by_one(target):
    """decode_batch (growing cache, rows leaving the batch) = each prompt decoded alone."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 500, (n,), generator=g) for n in (7, 19, 3)]
    budgets = [30, 9, 17]
    together = decode_batch(target, prompts, budgets, frozenset(), pad_id=0)
    alone = [decode_batch(target, [p], [b], frozenset(), pad_id=0)[0] for p, b in zip(prompts, budgets)]
    assert together == alone and [len(t) for t in together] == budgets
