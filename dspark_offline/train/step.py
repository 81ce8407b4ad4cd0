"""One micro-batch of the objective, with the data-parallel normalisation around it.

The model code is single-device (`model/`): the drafter's forward returns a `DraftOutput` and
`model.dspark_loss` turns it into local sums. Here the forward runs through the DeepSpeed
engine, and the loss that is backpropagated is

    world · (α_ce ΣCE·w + α_l1 ΣL1·w + α_conf ΣBCE·w) / allreduce(Σw)

over the data-parallel group (DESIGN §4 item 9): DeepSpeed averages gradients over the group,
so this is a true token-pooled mean; one process with batch 2b and two with b each give the
same gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dspark_offline.model import DSparkDraft, LossConfig, LossSums, block_targets, dspark_loss


def drafter_of(engine) -> DSparkDraft:
    """The single-device drafter inside a DeepSpeed engine (or the drafter itself)."""
    return getattr(engine, "module", engine)


def local_sums(engine, batch: dict, anchors: torch.Tensor, keep: torch.Tensor, cfg: LossConfig) -> LossSums:
    """The drafter forward on the blocks at `anchors`/`keep` [Bt, A] and this rank's `LossSums`."""
    drafter = drafter_of(engine)
    targets = block_targets(batch, anchors, keep, drafter.cfg.block_size, cfg.gamma, cfg.l1_mode)
    # deferred blocks: dspark_loss computes the draft states chunk by chunk (memory flat in num_anchors)
    out = engine(batch["input_ids"], batch["hidden"], anchors, keep, defer_blocks=True)
    return dspark_loss(drafter, out, targets, cfg)


def pooled_loss(sums: LossSums, cfg: LossConfig, dp_group=None) -> torch.Tensor:
    """world · objective / Σw over the data-parallel group (a world of one without torch.distributed)."""
    total_w, world = sums.weight.detach().clone(), 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_w, op=dist.ReduceOp.SUM, group=dp_group)
        world = dist.get_world_size(group=dp_group)
    return world * sums.objective(cfg) / total_w.clamp_min(1e-12)
