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

    def forward(
        self,
        x: torch.Tensor,  # [Bt, Q, H] normed block states
        ctx: torch.Tensor,  # [Bt, T, H] context (hidden_norm(fc(...)))
        rope_q: tuple[torch.Tensor, torch.Tensor],  # cos/sin [Bt, Q, hd] at block positions
        rope_ctx: tuple[torch.Tensor, torch.Tensor],  # cos/sin [Bt, T, hd] at context positions
        mask: torch.Tensor,  # [Bt, Q, T+Q] bool, True = attend
    ) -> torch.Tensor:  # [Bt, Q, H]
        # q/k RMSNorm is per head over hd (the last dim), so it is layout-independent
        q = self.q_norm(self._heads(self.q_proj(x), self.nh))  # [Bt, nh, Q, hd]
        k_blk = self.k_norm(self._heads(self.k_proj(x), self.nkv))  # [Bt, nkv, Q, hd]
        k_ctx = self.k_norm(self._heads(self.k_proj(ctx), self.nkv))  # [Bt, nkv, T, hd]
        v = torch.cat([self._heads(self.v_proj(ctx), self.nkv), self._heads(self.v_proj(x), self.nkv)], dim=2)
        q = apply_rope(q, *rope_q)  # [Bt, nh, Q, hd]
        k = torch.cat([apply_rope(k_ctx, *rope_ctx), apply_rope(k_blk, *rope_q)], dim=2)  # [Bt, nkv, T+Q, hd]
        # A fully masked row (padding block) would make SDPA softmax over nothing (NaN). Let such
        # rows attend everywhere and zero their output afterwards: finite forward, zero grads.
        has_key = mask.any(dim=-1, keepdim=True)  # [Bt, Q, 1]
        safe = mask | ~has_key
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=safe[:, None], enable_gqa=self.nh != self.nkv
        )  # [Bt, nh, Q, hd]
        out = out.transpose(1, 2).reshape(*x.shape[:2], self.nh * self.hd)  # [Bt, Q, nh·hd]
        out = out * has_key.to(out.dtype)
        return self.o_proj(out)


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

    def forward(self, x, ctx, rope_q, rope_ctx, mask) -> torch.Tensor:  # [Bt, Q, H]
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_ctx, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
