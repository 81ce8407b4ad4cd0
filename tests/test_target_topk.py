"""topk_from_final against a plain full-softmax reference."""

from __future__ import annotations

import pytest
import torch

from dspark_offline.target.topk import chunk_tokens_for, topk_from_final


def _reference(final: torch.Tensor, head: torch.Tensor, k: int):
    probs = torch.softmax(final.double() @ head.double().T, dim=-1)  # [..., V] fp64
    top, ids = probs.topk(k, dim=-1)
    return ids, top.float(), probs


def _data(t=37, h=16, v=500, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    final = (torch.randn(t, h, generator=g) * 2).to(dtype)
    head = torch.randn(v, h, generator=g).to(dtype)
    return final, head


def test_matches_full_softmax():
    final, head = _data()
    ids, probs = topk_from_final(final, head, 10)
    ref_ids, ref_probs, full = _reference(final, head, 10)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32
    assert ids.shape == probs.shape == (37, 10)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.gather(-1, ids).float(), probs, rtol=1e-5, atol=1e-7)
    assert torch.equal(ids, ref_ids)
    assert (probs[:, :-1] >= probs[:, 1:]).all()


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 1000])
def test_chunking_does_not_change_results(chunk):
    final, head = _data()
    ids, probs = topk_from_final(final, head, 8)
    c_ids, c_probs = topk_from_final(final, head, 8, chunk_tokens=chunk)
    assert torch.equal(c_ids, ids)
    # fp32 matmuls of different row counts may round differently (~1 ulp of the logits)
    torch.testing.assert_close(c_probs, probs, rtol=2e-5, atol=1e-7)


def test_leading_dims_and_bf16_inputs():
    final, head = _data(t=24, dtype=torch.bfloat16)
    ids, probs = topk_from_final(final.reshape(2, 3, 4, -1), head, 5)
    assert ids.shape == (2, 3, 4, 5) and probs.dtype == torch.float32
    # computed in fp32 from the bf16 values: equals the fp64 reference of the same values
    _, ref_probs, _ = _reference(final, head, 5)
    torch.testing.assert_close(probs.reshape(24, 5), ref_probs, rtol=1e-5, atol=1e-7)


def test_full_vocab_k_sums_to_one():
    final, head = _data(t=3, v=50)
    _, probs = topk_from_final(final, head, 50)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    final, head = _data()
    with pytest.raises(ValueError, match=r"top_k=0 .*vocab_size=500"):
        topk_from_final(final, head, 0)
    with pytest.raises(ValueError, match=r"top_k=501"):
        topk_from_final(final, head, 501)
    with pytest.raises(ValueError, match=r"does not match lm_head \[500, 8\]"):
        topk_from_final(final, head[:, :8], 4)


def test_chunk_budget():
    assert chunk_tokens_for(49152) == 1365  # 256 MiB of fp32 logits
    assert chunk_tokens_for(10**12) == 1
