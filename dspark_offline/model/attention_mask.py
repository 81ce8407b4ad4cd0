"""The DSpark block/context attention mask (DESIGN §4 item 4).

Key layout (shared by training and inference): `[ctx positions 0..T) ; block slots of every
block, block-major]`, i.e. key index `T + n·B + j` is slot `j` of block `n`. A query (slot of
block n, anchored at position a_n) may see:

- context key t iff `ctx_position[t] < a_n` (strictly: the target state of position a_n is
  produced *after* reading x[a_n], which at inference is the token being verified, so it does
  not exist yet when the block is drafted);
- every slot of its own block (bidirectional: block diffusion, not causal);
- nothing else: not other blocks, not padding context, and nothing at all for a padding
  block (keep = False).

Padding context positions (t ≥ sample length) are never visible because anchors lie inside
the sample (a < length), so `t < a` already excludes them.
"""

from __future__ import annotations

import torch


def block_attention_mask(
    anchors: torch.Tensor,  # [Bt, A] int64, block start positions
    keep: torch.Tensor,  # [Bt, A] bool, False = padding block
    ctx_len: int,  # T, number of context keys
    block_size: int,  # B
    ctx_positions: torch.Tensor | None = None,  # [T] or [Bt, T] int64; default arange(T)
) -> torch.Tensor:  # [Bt, A·B, T + A·B] bool, True = may attend
    bt, a = anchors.shape
    dev = anchors.device
    if ctx_positions is None:
        ctx_positions = torch.arange(ctx_len, device=dev)
    if ctx_positions.dim() == 1:
        ctx_positions = ctx_positions.unsqueeze(0).expand(bt, -1)  # [Bt, T]
    # context part: query block n sees ctx key t iff pos[t] < a_n and the block is real
    ctx_vis = ctx_positions[:, None, :] < anchors[:, :, None]  # [Bt, A, T]
    ctx_vis = ctx_vis & keep[:, :, None]
    ctx_vis = ctx_vis.repeat_interleave(block_size, dim=1)  # [Bt, A·B, T]
    # block part: block-diagonal, only for real blocks
    blk_id = torch.arange(a, device=dev).repeat_interleave(block_size)  # [A·B]
    same_block = blk_id[:, None] == blk_id[None, :]  # [A·B, A·B]
    keep_q = keep.repeat_interleave(block_size, dim=1)  # [Bt, A·B]
    blk_vis = same_block[None] & keep_q[:, :, None]  # [Bt, A·B, A·B]
    return torch.cat([ctx_vis, blk_vis], dim=-1)
