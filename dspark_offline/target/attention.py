"""The target's attention: HF's SDPA, without copying the KV heads for grouped-query attention on CPU.

HF's stock "sdpa" attention repeats every key/value head ``num_key_value_groups`` times
(``repeat_kv``, a full copy of the layer's KV cache) whenever an attention mask is passed, because
CUDA's fused kernels cannot take a mask together with ``enable_gqa``. Batched generation and
block verification always pass a mask, so on CPU every decoding step copied the whole KV cache
of every layer (SmolLM2: 3 KV heads -> 9). PyTorch's CPU SDPA handles ``enable_gqa`` with a mask
and gives the same values: this implementation uses it there and is HF's SDPA everywhere else
(benchmarks/target_decode.py measures both).

Registered with transformers under `ATTENTION` (attention and mask interfaces); `load_model`
loads every target with it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "dspark_sdpa"


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, q, d]
    key: torch.Tensor,  # [b, kv_heads, k, d]
    value: torch.Tensor,  # [b, kv_heads, k, d]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature -> ([b, q, heads, d], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    masked_gqa_on_cpu = (
        attention_mask is not None
        and groups > 1
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
    )
    if not masked_gqa_on_cpu:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, gqa_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
