"""The draft backbone is a Qwen3 decoder stack under the serving names.

Loading our exported tensors into transformers' own Qwen3 layers (by name, strictly) and running
them bidirectionally on a block with no visible context must reproduce our backbone: this pins
q/k norm, RoPE layout, GQA, the residual order and every weight name the server maps.
"""

from __future__ import annotations

import pytest
import torch

from dspark_offline.model import block_attention_mask, save_serving


def test_backbone_equals_hf_qwen3_layers_without_context(make_tiny_draft, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RotaryEmbedding

    model = make_tiny_draft().eval()
    save_serving(model, tmp_path)
    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    hf_cfg._attn_implementation = "sdpa"
    hf = Qwen3Model(hf_cfg).eval()
    ours = {
        k: v
        for k, v in load_file(str(tmp_path / "model.safetensors")).items()
        if k.startswith(("layers.", "norm."))
    }
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) == {"embed_tokens.weight"}
    for layer in hf.layers:
        layer.self_attn.is_causal = False  # a DSpark block attends to itself bidirectionally

    b, start = model.cfg.block_size, 5
    emb = torch.randn(1, b, 32)
    pos = (start + torch.arange(b))[None]  # [1, B]
    with torch.no_grad():
        ctx = torch.zeros(1, 0, 32)  # no visible context
        mask = block_attention_mask(torch.tensor([[start]]), torch.ones(1, 1, dtype=torch.bool), 0, b)
        got = model.backbone(emb, pos, ctx, torch.zeros(1, 0, dtype=torch.long), mask)
        x = emb
        rope = Qwen3RotaryEmbedding(hf_cfg)(x, pos)
        for layer in hf.layers:
            x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
            x = x[0] if isinstance(x, tuple) else x
        want = hf.norm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_context_goes_through_fc_and_hidden_norm_only(make_tiny_draft):
    """ctx = hidden_norm(fc(concat of the L layer states, layer-major)); no input_layernorm."""
    model = make_tiny_draft()
    hidden = torch.randn(2, 5, 2, 32)
    with torch.no_grad():
        want = model.hidden_norm(torch.cat([hidden[:, :, 0], hidden[:, :, 1]], dim=-1) @ model.fc.weight.T)
        torch.testing.assert_close(model.context(hidden), want)
    with pytest.raises(ValueError, match="L=2"):
        model.context(torch.randn(1, 5, 3, 32))


def test_missing_target_head_is_a_clear_error(make_tiny_draft):
    from dspark_offline.model import DSparkDraft

    bare = DSparkDraft(make_tiny_draft().cfg)
    with pytest.raises(RuntimeError, match="set_target_head"):
        bare(
            torch.zeros(1, 8, dtype=torch.long),
            torch.randn(1, 8, 2, 32),
            torch.tensor([[1]]),
            torch.ones(1, 1, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="embed_tokens"):
        bare.set_target_head(torch.zeros(10, 32), torch.zeros(97, 32))
