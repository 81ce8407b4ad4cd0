"""Data-parallel normalisation (DESIGN §4 item 9): 1 process with batch 2b == 2 processes with b.

Each of two gloo processes computes the loss on its half of the batch (`train.step.pooled_loss`);
averaging their gradients (what DeepSpeed does) must equal the single-process gradient of the whole
batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dspark_offline.config import TrainConfig
from dspark_offline.model import (
    DraftModelConfig,
    DSparkDraft,
    LossConfig,
    block_targets,
    dspark_loss,
    sample_anchors,
)
from dspark_offline.train.step import pooled_loss

DIMS = {
    "hidden_size": 16,
    "num_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "intermediate_size": 24,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "vocab_size": 41,
    "num_target_layers": 4,
    "target_layer_ids": (0, 2),
    "block_size": 3,
    "markov_rank": 4,
    "mask_token_id": 40,
}


def _model():
    torch.manual_seed(0)
    model = DSparkDraft(DraftModelConfig(**DIMS))
    g = torch.Generator().manual_seed(1)
    model.set_target_head(torch.randn(41, 16, generator=g), torch.randn(41, 16, generator=g) * 0.3)
    return model


def _batch():
    g = torch.Generator().manual_seed(2)
    bt, s, k = 2, 20, 5
    mask = torch.zeros(bt, s, dtype=torch.bool)
    mask[0, 3:20] = True
    mask[1, 8:14] = True  # very different token counts per row: a per-rank mean would be wrong
    probs = torch.softmax(torch.randn(bt, s, 41, generator=g), -1)
    tp, ti = probs.topk(k, -1)
    batch = {
        "input_ids": torch.randint(0, 40, (bt, s), generator=g),
        "loss_mask": mask,
        "lengths": torch.tensor([20, 16]),
        "hidden": torch.randn(bt, s, 2, 16, generator=g),
        "topk_ids": ti,
        "topk_probs": tp,
    }
    anchors, keep = sample_anchors(mask, batch["lengths"], 6, torch.Generator().manual_seed(3))
    return batch, anchors, keep


def _loss(model, batch, anchors, keep):
    """The training loss: the drafter's sums normalised by Σw all-reduced over the process group."""
    cfg = LossConfig.from_train(TrainConfig(l1_mode="topk"))
    targets = block_targets(batch, anchors, keep, model.cfg.block_size, cfg.gamma, cfg.l1_mode)
    out = model(batch["input_ids"], batch["hidden"], anchors, keep)
    return pooled_loss(dspark_loss(model, out, targets, cfg), cfg)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        batch, anchors, keep = _batch()
        half = {k: v[rank : rank + 1] for k, v in batch.items()}
        loss = _loss(model, half, anchors[rank : rank + 1], keep[rank : rank + 1])
        loss.backward()
        g = _grads(model)
        dist.all_reduce(g)
        g /= 2  # DeepSpeed averages gradients over the data-parallel group
        if rank == 0:
            torch.save(g, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~25 s on a shared 2-core box
def test_two_processes_equal_one_process(tmp_path):
    model = _model()
    batch, anchors, keep = _batch()
    loss = _loss(model, batch, anchors, keep)
    loss.backward()
    single = _grads(model)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out), single, rtol=1e-5, atol=1e-7)
