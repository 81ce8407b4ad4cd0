"""Block/context attention mask and anchor sampler (issue "Stage 2" item 1)."""

from __future__ import annotations

import pytest
import torch

from dspark_offline.model import block_attention_mask, sample_anchors
from dspark_offline.model.anchors import anchor_candidates


def reference_mask(anchors, keep, ctx_len, b):
    """Element by element from the rules: ctx t visible iff t < a; own block only; padding none."""
    bt, a = anchors.shape
    ref = torch.zeros(bt, a * b, ctx_len + a * b, dtype=torch.bool)
    for r in range(bt):
        for n in range(a):
            if not keep[r, n]:
                continue
            for i in range(b):
                q = n * b + i
                for t in range(ctx_len):
                    ref[r, q, t] = t < anchors[r, n]
                for k in range(a * b):
                    ref[r, q, ctx_len + k] = k // b == n
    return ref


CASES = {
    "anchor0": ([[0, 3]], [[True, True]], 10, 3),
    "end": ([[7, 8]], [[True, True]], 10, 4),  # a = S-2 and S-3 with blocks running past S
    "consecutive": ([[2, 3, 4]], [[True, True, True]], 8, 2),
    "padding": ([[1, 5, 0], [4, 0, 0]], [[True, True, False], [True, False, False]], 9, 3),
    "B1": ([[0, 2, 5]], [[True, True, True]], 7, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mask_matches_reference(name):
    anchors, keep, s, b = CASES[name]
    anchors, keep = torch.tensor(anchors), torch.tensor(keep)
    got = block_attention_mask(anchors, keep, s, b)
    assert torch.equal(got, reference_mask(anchors, keep, s, b))


def test_fully_masked_rows_give_zero_not_nan(make_tiny_draft):
    """A padding block, and anchor 0 with no context, both stay finite; padding rows are 0."""
    model = make_tiny_draft()
    b = model.cfg.block_size
    ctx = torch.randn(1, 6, 32)
    anchors, keep = torch.tensor([[0, 3, 0]]), torch.tensor([[True, True, False]])
    mask = block_attention_mask(anchors, keep, 6, b)
    x = torch.randn(1, 3 * b, 32, requires_grad=True)
    attn = model.layers[0].self_attn
    from dspark_offline.model.layers import rope_cos_sin

    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    pos_q = (anchors[:, :, None] + torch.arange(b)).flatten(1)
    ctx_kv = attn.context_kv(ctx, rope_cos_sin(torch.arange(6)[None], inv, x.dtype))
    out = attn(x, ctx_kv, rope_cos_sin(pos_q, inv, x.dtype), mask)
    assert torch.isfinite(out).all()
    pre_o = out  # o_proj has no bias, so a zero attention output stays zero
    assert torch.count_nonzero(pre_o[0, 2 * b :]) == 0
    assert pre_o[0, : 2 * b].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[0, 2 * b :]) == 0


def test_candidates_rule():
    m = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    lengths = torch.tensor([7])  # positions 7, 8 are padding
    cand = anchor_candidates(m, lengths)
    # a with m[a]=m[a+1]=1 and a <= len-2 = 5
    assert cand[0].nonzero().flatten().tolist() == [1, 2, 5]


def test_sample_anchors_sorted_unique_padded():
    g = torch.Generator().manual_seed(0)
    s = 40
    m = torch.zeros(3, s, dtype=torch.bool)
    m[0, 5:30] = True
    m[1, 10:13] = True  # candidates 10, 11
    lengths = torch.tensor([40, 20, 40])  # row 2 has no candidate
    anchors, keep = sample_anchors(m, lengths, 8, g)
    cand = anchor_candidates(m, lengths)
    assert anchors.shape == keep.shape == (3, 8) and anchors.dtype == torch.int64
    assert keep.sum(1).tolist() == [8, 2, 0]
    for r in range(3):
        real = anchors[r][keep[r]]
        assert torch.all(real[1:] > real[:-1])  # sorted, without replacement
        assert cand[r, real].all()
        assert not keep[r, int(keep[r].sum()) :].any()  # padding after the real anchors
    assert anchors[1][keep[1]].tolist() == [10, 11]


def test_sample_anchors_is_random_and_seeded():
    m = torch.ones(1, 200, dtype=torch.bool)
    lengths = torch.tensor([200])
    a1, _ = sample_anchors(m, lengths, 16, torch.Generator().manual_seed(1))
    a2, _ = sample_anchors(m, lengths, 16, torch.Generator().manual_seed(1))
    a3, _ = sample_anchors(m, lengths, 16, torch.Generator().manual_seed(2))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


@pytest.mark.parametrize("ctx_len", [0, 1, 13])
def test_blockwise_attention_equals_dense_sdpa(ctx_len):
    """The compact per-block attention (the CPU training path) gives the dense-mask SDPA result,
    forward and backward, with anchor 0, adjacent anchors and padding blocks."""
    from dspark_offline.model.attention_mask import block_layout
    from dspark_offline.model.layers import _dense_attention, blockwise_attention

    g = torch.Generator().manual_seed(ctx_len)
    bt, nh, nkv, hd, b = 2, 4, 2, 8, 3
    anchors = torch.tensor([[0, 4, 5, 0], [2, 7, 11, 12]])
    keep = torch.tensor([[True, True, True, False], [True, True, True, True]])
    a = anchors.shape[1]
    layout = block_layout(anchors, keep, ctx_len, b)
    shapes = {
        "q": (bt, nh, a * b, hd),
        "k_ctx": (bt, nkv, ctx_len, hd),
        "v_ctx": (bt, nkv, ctx_len, hd),
        "k_blk": (bt, nkv, a * b, hd),
        "v_blk": (bt, nkv, a * b, hd),
    }
    t = {
        k: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
        for k, shape in shapes.items()
    }
    got = blockwise_attention(t["q"], t["k_ctx"], t["v_ctx"], t["k_blk"], t["v_blk"], layout)
    want = _dense_attention(
        t["q"], torch.cat([t["k_ctx"], t["k_blk"]], 2), torch.cat([t["v_ctx"], t["v_blk"]], 2), layout.dense()
    )
    torch.testing.assert_close(got, want)
    assert torch.equal(layout.dense(), block_attention_mask(anchors, keep, ctx_len, b))
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads_got = torch.autograd.grad((got * w).sum(), list(t.values()))
    grads_want = torch.autograd.grad((want * w).sum(), list(t.values()))
    for name, x, y in zip(t, grads_got, grads_want):
        torch.testing.assert_close(x, y, msg=name)
    assert got[0, :, 3 * b :].abs().sum() == 0  # the padding block outputs 0
