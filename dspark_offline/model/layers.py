"""Qwen3-style draft decoder layer with DFlash context attention.

Parameter names are exactly the serving names (`self_attn.{q,k,v,o}_proj`,
`self_attn.{q,k}_norm`, `input_layernorm`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`)
so a state dict exports without renaming.

What the serving side does, and therefore what we train (SGLang `dflash.py`
`write_target_hidden_kv`, DeepSpec `Qwen3DSparkAttention`): the context `ctx` (already
`hidden_norm(fc(...))`) goes straight into `k_proj`/`v_proj` — it does NOT pass through the
layer's `input_layernorm` — then `k_norm`, then RoPE at the context's own positions. Block
tokens go through `input_layernorm` and q/k/v, q/k norm, RoPE at positions a..a+B−1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention_mask import BlockLayout
from .config import DraftModelConfig


class RMSNorm(nn.Module):
    """HF/Qwen3 RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor,  # [Bt, N] int64
    inv_freq: torch.Tensor,  # [hd/2] float32
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin [Bt, N, hd]
    freqs = positions.float()[..., None] * inv_freq  # [Bt, N, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [Bt, N, hd] (neox layout, as HF Qwen3/Llama)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [Bt, nh, N, hd]; cos/sin [Bt, N, hd]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class DraftAttention(nn.Module):
    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(h, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # [Bt, N, n·hd] -> [Bt, n, N, hd]
        return x.view(*x.shape[:2], n, self.hd).transpose(1, 2)

    def context_kv(
        self,
        ctx: torch.Tensor,  # [Bt, T, H] context (hidden_norm(fc(...)))
        rope_ctx: tuple[torch.Tensor, torch.Tensor],  # cos/sin [Bt, T, hd] at context positions
    ) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values [Bt, nkv, T, hd]
        """The context's keys (k_norm, RoPE) and values: shared by every block, so computed once."""
        k_ctx = apply_rope(self.k_norm(self._heads(self.k_proj(ctx), self.nkv)), *rope_ctx)
        return k_ctx, self._heads(self.v_proj(ctx), self.nkv)

    def forward(
        self,
        x: torch.Tensor,  # [Bt, Q, H] normed block states
        ctx_kv: tuple[torch.Tensor, torch.Tensor],  # context keys/values [Bt, nkv, T, hd] (`context_kv`)
        rope_q: tuple[torch.Tensor, torch.Tensor],  # cos/sin [Bt, Q, hd] at block positions
        mask: torch.Tensor | BlockLayout,  # [Bt, Q, T+Q] bool (True = attend), or the compact layout
    ) -> torch.Tensor:  # [Bt, Q, H]
        # q/k RMSNorm is per head over hd (the last dim), so it is layout-independent
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.nh)), *rope_q)  # [Bt, nh, Q, hd]
        k_blk = apply_rope(self.k_norm(self._heads(self.k_proj(x), self.nkv)), *rope_q)  # [Bt, nkv, Q, hd]
        v_blk = self._heads(self.v_proj(x), self.nkv)
        k_ctx, v_ctx = ctx_kv
        if isinstance(mask, BlockLayout) and q.device.type == "cpu":
            out = blockwise_attention(q, k_ctx, v_ctx, k_blk, v_blk, mask)  # [Bt, nh, Q, hd]
        else:  # CUDA: SDPA's kernels take the dense mask without materialising the scores
            dense = mask.dense() if isinstance(mask, BlockLayout) else mask
            out = _dense_attention(
                q, torch.cat([k_ctx, k_blk], dim=2), torch.cat([v_ctx, v_blk], dim=2), dense
            )
        out = out.transpose(1, 2).reshape(*x.shape[:2], self.nh * self.hd)  # [Bt, Q, nh·hd]
        return self.o_proj(out)


def _dense_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over [ctx ; block] keys with a dense bool mask [Bt, Q, T+Q]; q [Bt, nh, Q, hd]."""
    # A fully masked row (padding block) would make SDPA softmax over nothing (NaN). Let such
    # rows attend everywhere and zero their output afterwards: finite forward, zero grads.
    has_key = mask.any(dim=-1, keepdim=True)  # [Bt, Q, 1]
    safe = mask | ~has_key
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=safe[:, None], enable_gqa=q.shape[1] != k.shape[1]
    )
    return out * has_key[:, None].to(out.dtype)  # [Bt, nh, Q, hd]


def blockwise_attention(
    q: torch.Tensor,  # [Bt, nh, A·B, hd] queries, block-major
    k_ctx: torch.Tensor,  # [Bt, nkv, T, hd]
    v_ctx: torch.Tensor,  # [Bt, nkv, T, hd]
    k_blk: torch.Tensor,  # [Bt, nkv, A·B, hd]
    v_blk: torch.Tensor,  # [Bt, nkv, A·B, hd]
    layout: BlockLayout,
) -> torch.Tensor:  # [Bt, nh, A·B, hd]
    """Exact attention of every block over its visible context and itself, one softmax per query.

    Same result as SDPA with `layout.dense()`, but the block part costs A·B² instead of (A·B)²
    scores: each query scores the T context keys and the B keys of its own block. A query always
    sees its own block, so no softmax row is empty; padding blocks are zeroed at the end.
    """
    bt, nh, qn, hd = q.shape
    nkv, t, b = k_ctx.shape[1], k_ctx.shape[2], layout.block_size
    g, a = nh // nkv, qn // b
    qg = q.reshape(bt, nkv, g, qn, hd) * hd**-0.5  # GQA: g query heads share a kv head
    s_ctx = qg @ k_ctx[:, :, None].transpose(-1, -2)  # [Bt, nkv, g, A·B, T]
    hidden = ~layout.ctx_visible.repeat_interleave(b, dim=1)[:, None, None]  # [Bt, 1, 1, A·B, T]
    s_ctx = s_ctx.masked_fill(hidden, float("-inf")).view(bt, nkv, g, a, b, t)
    s_blk = qg.view(bt, nkv, g, a, b, hd) @ k_blk.view(bt, nkv, 1, a, b, hd).transpose(
        -1, -2
    )  # [.., A, B, B]
    scores = torch.cat([s_ctx, s_blk], dim=-1)  # [Bt, nkv, g, A, B, T+B]
    p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    out = p[..., :t].reshape(bt, nkv, g, qn, t) @ v_ctx[:, :, None]  # [Bt, nkv, g, A·B, hd]
    out = out + (p[..., t:] @ v_blk.view(bt, nkv, 1, a, b, hd)).view(bt, nkv, g, qn, hd)
    keep = layout.keep.repeat_interleave(b, dim=1)[:, None, :, None].to(out.dtype)  # [Bt, 1, A·B, 1]
    return out.view(bt, nh, qn, hd) * keep


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln(x), ctx); x + mlp(ln(x))."""

    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, x, ctx_kv, rope_q, mask) -> torch.Tensor:  # [Bt, Q, H]
        x = x + self.self_attn(self.input_layernorm(x), ctx_kv, rope_q, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
