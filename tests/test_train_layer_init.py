"""Draft layers started from the target's own layers (train.layer_init: target; train/layer_init.py)."""

from __future__ import annotations

import pytest
import torch

from dspark_offline.model import DraftModelConfig, DSparkDraft
from dspark_offline.target.backend import _rope_theta
from dspark_offline.train.layer_init import LayerInitError, copied_layers, init_layers_from_target


def _target(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _draft_for(target, layer_ids, num_layers=1, **overrides) -> DSparkDraft:
    c = target.config
    dims = {
        "hidden_size": c.hidden_size,
        "num_layers": num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": _rope_theta(c),
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "num_target_layers": c.num_hidden_layers,
        "target_layer_ids": tuple(layer_ids),
        "block_size": 4,
        "markov_rank": 8,
        "mask_token_id": 1,
    }
    dims.update(overrides)
    torch.manual_seed(0)
    draft = DSparkDraft(DraftModelConfig(**dims))
    draft.set_target_head(target.model.embed_tokens, target.lm_head)
    return draft


@pytest.mark.parametrize(
    ("layer_ids", "n_target", "n_draft", "want"),
    [((27, 1, 14), 30, 1, [28]), ((29,), 30, 1, [29]), ((27,), 30, 3, [27, 28, 29]), ((0, 1), 4, 2, [2, 3])],
)
def test_the_layers_after_the_deepest_stored_one_are_copied(layer_ids, n_target, n_draft, want):
    assert copied_layers(layer_ids, n_target, n_draft) == want


def test_more_draft_layers_than_the_target_has_is_refused():
    with pytest.raises(LayerInitError, match="draft.num_layers=5 exceeds the target's 4 layers"):
        copied_layers((1,), 4, 5)


def test_the_copied_layer_sees_the_context_as_the_target_layer_did(tiny_qwen3_dir):
    """With fc passing the deepest stored layer through and hidden_norm = the next layer's
    input_layernorm, the draft layer's context keys/values are that target layer's own keys/values
    (Qwen3: q/k norms copied too), and every copied tensor equals the target's."""
    target = _target(tiny_qwen3_dir)
    draft = _draft_for(target, layer_ids=(1, 0))  # unsorted: the deepest is the first entry
    line = init_layers_from_target(draft, tiny_qwen3_dir, target.model.norm.weight)
    assert "target layers [2]" in line and "passes layer 1 through" in line and "kept" not in line
    for name, p in draft.layers[0].named_parameters():
        assert torch.equal(p, target.model.layers[2].get_parameter(name)), name
    assert torch.equal(draft.norm.weight, target.model.norm.weight)

    ids = torch.randint(5, target.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = target(input_ids=ids, use_cache=True, output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[2], out.hidden_states[1]], dim=2)  # dspark ids 1, 0
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        k, v = draft.context_kv(draft.context(hidden), positions)[0]
    cache = out.past_key_values.layers[2]
    torch.testing.assert_close(k, cache.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, cache.values, rtol=1e-5, atol=1e-5)


def test_a_llama_target_keeps_the_q_k_norms_at_one_and_says_so(tiny_llama_dir):
    target = _target(tiny_llama_dir)
    draft = _draft_for(target, layer_ids=(0, 2))
    line = init_layers_from_target(draft, tiny_llama_dir, target.model.norm.weight)
    assert "target layers [3]" in line and "k_norm" in line and "q_norm" in line
    attn = draft.layers[0].self_attn
    assert torch.equal(attn.q_norm.weight, torch.ones_like(attn.q_norm.weight))
    assert torch.equal(attn.o_proj.weight, target.model.layers[3].self_attn.o_proj.weight)


def test_a_narrower_draft_mlp_is_refused_naming_the_field(tiny_qwen3_dir):
    target = _target(tiny_qwen3_dir)
    draft = _draft_for(target, layer_ids=(1,), intermediate_size=96)
    with pytest.raises(LayerInitError, match="draft.intermediate_size"):
        init_layers_from_target(draft, tiny_qwen3_dir, target.model.norm.weight)


def test_attention_biases_the_drafter_cannot_hold_are_refused(tmp_path, embedded_target_dir):
    from conftest import _save_tiny

    path = _save_tiny(tmp_path / "biased", embedded_target_dir, "llama", attention_bias=True)
    target = _target(path)
    draft = _draft_for(target, layer_ids=(1,))
    with pytest.raises(LayerInitError, match=r"self_attn\.q_proj\.bias.*train\.layer_init: random"):
        init_layers_from_target(draft, path, target.model.norm.weight)
