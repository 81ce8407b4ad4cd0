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

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """The same visibility as `block_attention_mask`, kept compact: what each block may see of the
    context, which blocks are real, and the block size. The block-to-block part is implied (a block
    sees only itself), so attention can be computed per block instead of over all A·B block keys
    (`layers.blockwise_attention`), which is what makes many anchors per sample affordable."""

    ctx_visible: torch.Tensor  # [Bt, A, T] bool: block n may attend to context key t
    keep: torch.Tensor  # [Bt, A] bool: False = padding block
    block_size: int

    def dense(self) -> torch.Tensor:  # [Bt, A·B, T + A·B] bool, exactly block_attention_mask
        _, a, _ = self.ctx_visible.shape
        b = self.block_size
        ctx_vis = (self.ctx_visible & self.keep[:, :, None]).repeat_interleave(b, dim=1)  # [Bt, A·B, T]
        blk_id = torch.arange(a, device=self.keep.device).repeat_interleave(b)  # [A·B]
        same_block = blk_id[:, None] == blk_id[None, :]  # [A·B, A·B]
        keep_q = self.keep.repeat_interleave(b, dim=1)  # [Bt, A·B]
        return torch.cat([ctx_vis, same_block[None] & keep_q[:, :, None]], dim=-1)


def block_layout(
    anchors: torch.Tensor,  # [Bt, A] int64, block start positions
    keep: torch.Tensor,  # [Bt, A] bool, False = padding block
    ctx_len: int,  # T, number of context keys
    block_size: int,  # B
    ctx_positions: torch.Tensor | None = None,  # [T] or [Bt, T] int64; default arange(T)
) -> BlockLayout:
    """Block n sees context key t iff ``ctx_positions[t] < anchors[n]`` (see the module docstring)."""
    bt = anchors.shape[0]
    if ctx_positions is None:
        ctx_positions = torch.arange(ctx_len, device=anchors.device)
    if ctx_positions.dim() == 1:
        ctx_positions = ctx_positions.unsqueeze(0).expand(bt, -1)  # [Bt, T]
    return BlockLayout(ctx_positions[:, None, :] < anchors[:, :, None], keep, block_size)


def block_attention_mask(
    anchors: torch.Tensor,  # [Bt, A] int64, block start positions
    keep: torch.Tensor,  # [Bt, A] bool, False = padding block
    ctx_len: int,  # T, number of context keys
    block_size: int,  # B
    ctx_positions: torch.Tensor | None = None,  # [T] or [Bt, T] int64; default arange(T)
) -> torch.Tensor:  # [Bt, A·B, T + A·B] bool, True = may attend
    return block_layout(anchors, keep, ctx_len, block_size, ctx_positions).dense()
