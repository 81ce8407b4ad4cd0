"""Deferred block states (issue 11 item 4): the training forward computes only the context keys/values
every block shares, and the objective computes the block states chunk by chunk (checkpointed), so a
step's memory does not grow with num_anchors. The objective must not change: same losses, metrics
and gradients as computing every block at once (the path before)."""

from __future__ import annotations

import pytest
import torch
from test_model_loss import loss_cfg, make_batch

from dspark_offline.model import block_targets, dspark_loss, sample_anchors
from dspark_offline.train.step import local_sums, pooled_loss


def _anchors(batch, num=8, seed=0):
    anchors, keep = sample_anchors(
        batch["loss_mask"], batch["lengths"], num, torch.Generator().manual_seed(seed)
    )
    assert not keep.all()  # the short row has padding blocks
    return anchors, keep


def _step(model, batch, anchors, keep, cfg, deferred: bool):
    """(loss, metrics, grads) of one objective evaluation on either path."""
    model.zero_grad(set_to_none=True)
    targets = block_targets(batch, anchors, keep, model.cfg.block_size, cfg.gamma, cfg.l1_mode)
    out = model(batch["input_ids"], batch["hidden"], anchors, keep, defer_blocks=deferred)
    assert (out.hidden is None) == deferred
    sums = dspark_loss(model, out, targets, cfg)
    loss = pooled_loss(sums, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), sums.metrics(cfg, per_slot=True), grads


@pytest.mark.parametrize("mode", ["topk", "recompute"])
@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_deferred_blocks_give_the_same_loss_metrics_and_gradients(make_tiny_draft, mode, chunk):
    model = make_tiny_draft()
    batch = make_batch(model, bt=3, s=20, final_hidden=True)
    anchors, keep = _anchors(batch, num=9)
    cfg = loss_cfg(chunk_blocks=chunk, l1_mode=mode)
    l_all, m_all, g_all = _step(model, batch, anchors, keep, cfg, deferred=False)
    l_def, m_def, g_def = _step(model, batch, anchors, keep, cfg, deferred=True)
    assert l_def == pytest.approx(l_all, rel=1e-6)
    for key, value in m_all.items():
        assert m_def[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for name, g in g_all.items():
        assert g.abs().sum() > 0, name  # every parameter is trained here
        torch.testing.assert_close(g_def[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_block_hidden_equals_every_block_at_once(make_tiny_draft):
    """Any blocks, in any row, padding blocks included, as the all-at-once forward computes them."""
    model = make_tiny_draft()
    batch = make_batch(model, bt=3, s=20)
    anchors, keep = _anchors(batch, num=9)
    with torch.no_grad():
        args = (batch["input_ids"], batch["hidden"], anchors, keep)
        every, deferred = model(*args).hidden, model(*args, defer_blocks=True)  # [Bt, A, B, H]
        rows = torch.tensor([0, 0, 1, 2, 2, 0, 2])  # any order; runs of one row share a backbone call
        blocks = torch.tensor([5, 1, 8, 0, 8, 3, 3])
        torch.testing.assert_close(
            model.block_hidden(deferred, rows, blocks), every[rows, blocks], rtol=1e-5, atol=1e-6
        )
        for r in range(3):
            a = anchors.shape[1]
            got = model.block_hidden(deferred, torch.full((a,), r), torch.arange(a))
            torch.testing.assert_close(got, every[r], rtol=1e-5, atol=1e-6)


def test_training_step_computes_at_most_one_chunk_of_blocks_at_a_time(make_tiny_draft, monkeypatch):
    """What keeps the memory flat: the training step (`local_sums`) never runs the decoder layers over
    more than chunk_blocks blocks, in the forward or in the backward's recomputation."""
    model = make_tiny_draft()
    batch = make_batch(model, bt=3, s=20)
    anchors, keep = _anchors(batch, num=10)
    queries, real = [], model._blocks

    def spy(embeds, *args):
        queries.append(embeds.shape[1])  # [1, Q, H]
        return real(embeds, *args)

    monkeypatch.setattr(model, "_blocks", spy)
    cfg = loss_cfg(chunk_blocks=3, l1_mode="topk")
    pooled_loss(local_sums(model, batch, anchors, keep, cfg), cfg).backward()
    b, n = model.cfg.block_size, len(block_targets(batch, anchors, keep, model.cfg.block_size, 4.0, "topk"))
    assert n > 3 and max(queries) <= 3 * b
    assert sum(queries) == 2 * n * b  # each supervised block once forward, once recomputed, nothing else


def test_deferred_step_without_a_supervised_block_reaches_every_parameter(make_tiny_draft):
    model = make_tiny_draft()
    batch = make_batch(model, bt=1)
    anchors, keep = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool)
    cfg = loss_cfg()
    loss = pooled_loss(local_sums(model, batch, anchors, keep, cfg), cfg)
    assert loss.item() == 0.0
    loss.backward()  # DeepSpeed needs a gradient for every parameter every step
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
