"""What the objective compares the drafter's blocks with (DESIGN §4 items 5 and 7).

`block_targets(batch, anchors, keep, block_size, gamma, l1_mode)` turns a batch of store
features and the sampled anchors into a `BlockTargets`: labels, teacher-forced previous tokens,
eval mask, weights and the cached target distribution of every slot, kept to the N blocks with
at least one supervised slot (only those cost logits).

Batch (right-padded): `input_ids [Bt,S] int64`, `loss_mask [Bt,S] bool`, `lengths [Bt]`,
`hidden [Bt,S,L,H]`, `topk_ids [Bt,S,K]`, `topk_probs [Bt,S,K] float32`, optional
`final_hidden [Bt,S,H]` (post-final-norm, read by `l1_mode` "recompute" and "exact").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .l1 import needs_final_hidden


class SlotGrid(NamedTuple):
    """Per slot of every block, all [Bt, A, B]."""

    labels: torch.Tensor  # int64 x[a+j+1]
    prev: torch.Tensor  # int64 x[a+j] (prev_0 = x[a]), the Markov head's teacher forcing
    eval: torch.Tensor  # bool e_j = cumprod_j(keep ∧ a+j+1 < len ∧ m[a+j+1])
    weight: torch.Tensor  # float32 e_j·exp(−j/γ)
    src: torch.Tensor  # int64 a+j: the position whose cached top-k is slot j's target


@dataclass
class BlockTargets:
    """The targets of the N supervised blocks (a block is supervised when its slot 0 is)."""

    rows: torch.Tensor  # [N] int64 batch row of each block
    blocks: torch.Tensor  # [N] int64 index of its anchor within the row
    labels: torch.Tensor  # [N, B] int64
    prev: torch.Tensor  # [N, B] int64
    eval: torch.Tensor  # [N, B] bool
    weight: torch.Tensor  # [N, B] float32
    topk_ids: torch.Tensor  # [N, B, K] target top-k ids of each slot
    topk_probs: torch.Tensor  # [N, B, K] float32, detached: a constant of the objective
    final_hidden: torch.Tensor | None  # [N, B, H] detached; None unless the l1_mode reads it

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, sl: slice) -> BlockTargets:
        """A chunk of blocks."""
        return BlockTargets(
            rows=self.rows[sl],
            blocks=self.blocks[sl],
            labels=self.labels[sl],
            prev=self.prev[sl],
            eval=self.eval[sl],
            weight=self.weight[sl],
            topk_ids=self.topk_ids[sl],
            topk_probs=self.topk_probs[sl],
            final_hidden=None if self.final_hidden is None else self.final_hidden[sl],
        )

    def select(self, block_hidden: torch.Tensor) -> torch.Tensor:
        """The draft states of these blocks, [Bt, A, B, H] (`DraftOutput.hidden`) -> [N, B, H]."""
        return block_hidden[self.rows, self.blocks]


def block_targets(
    batch: dict, anchors: torch.Tensor, keep: torch.Tensor, block_size: int, gamma: float, l1_mode: str
) -> BlockTargets:
    """The `BlockTargets` of a batch for anchors/keep [Bt, A] (from `sample_anchors`, or fixed)."""
    _check_batch(batch, l1_mode)
    ids, mask, lengths = batch["input_ids"], batch["loss_mask"], batch["lengths"]
    grid = slot_grid(ids, mask, lengths, anchors, keep, block_size, gamma)
    # only blocks with at least one supervised slot cost logits (slot 0 valid <=> any valid)
    rows, blocks = grid.eval[:, :, 0].nonzero(as_tuple=True)  # [N], [N]
    src = grid.src[rows, blocks]  # [N, B] position of each slot's target distribution
    at = rows[:, None].expand_as(src)  # [N, B]
    fh = batch["final_hidden"][at, src].detach() if needs_final_hidden(l1_mode) else None  # [N, B, H]
    return BlockTargets(
        rows=rows,
        blocks=blocks,
        labels=grid.labels[rows, blocks],
        prev=grid.prev[rows, blocks],
        eval=grid.eval[rows, blocks],
        weight=grid.weight[rows, blocks],
        topk_ids=batch["topk_ids"][at, src],
        # The target distribution is a constant of the objective: gradients reach the drafter only.
        topk_probs=batch["topk_probs"][at, src].detach().float(),
        final_hidden=fh,
    )


def slot_grid(input_ids, loss_mask, lengths, anchors, keep, block_size: int, gamma: float) -> SlotGrid:
    """Labels, teacher-forced prev tokens, eval mask, weights and target positions of every slot.

    slot j predicts x[a+j+1]; e_j = keep ∧ (a+j+1 < len) ∧ m[a+j+1], cumprod over j (a gap ends
    the block); w_j = e_j·exp(−j/γ); prev_j = x[a+j] (prev_0 = x[a]); the target distribution
    of slot j is the cached top-k at position a+j (`src`).
    """
    _bt, s = input_ids.shape
    j = torch.arange(block_size, device=anchors.device)
    lab_pos = anchors[:, :, None] + j + 1  # [Bt, A, B]
    lab_safe = lab_pos.clamp(max=s - 1)
    flat = lambda t, idx: torch.gather(t, 1, idx.flatten(1)).view(idx.shape)
    labels = flat(input_ids, lab_safe)
    inside = lab_pos < lengths.to(anchors.device)[:, None, None]
    ok = keep[:, :, None] & inside & flat(loss_mask.bool(), lab_safe)
    ev = ok.to(torch.int64).cumprod(dim=-1).bool()
    weight = ev.float() * torch.exp(-j.float() / gamma)
    src = (anchors[:, :, None] + j).clamp(max=s - 1)
    return SlotGrid(labels=labels, prev=flat(input_ids, src), eval=ev, weight=weight, src=src)


def _check_batch(batch: dict, l1_mode: str) -> None:
    need = ["input_ids", "loss_mask", "lengths", "hidden", "topk_ids", "topk_probs"]
    if needs_final_hidden(l1_mode):
        need.append("final_hidden")
    missing = [k for k in need if batch.get(k) is None]
    if missing:
        hint = (
            (
                f" (l1_mode={l1_mode!r} needs final_hidden: dump with dump.store_final_hidden=true, "
                "or train with l1_mode='capped' or 'topk')"
            )
            if "final_hidden" in missing
            else ""
        )
        raise KeyError(f"batch is missing {missing}{hint}")
