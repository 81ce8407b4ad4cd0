"""capture_layers: hook-captured states vs HF output_hidden_states, bit for bit.

The reference is the same model object run with ``output_hidden_states=True`` on the same batch,
so any difference at all is a convention bug (off-by-one layer, pre/post norm), not numerics.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dspark_offline.target.capture import UnsupportedArchitectureError, capture_layers, find_decoder_parts
from dspark_offline.target.layers import LayerIdError, dspark_to_hf_hidden_index


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def _batch(vocab: int, b: int = 2, s: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(20, vocab, (b, s), generator=g)  # [B, S]


@pytest.fixture(params=["llama", "qwen3"])
def tiny_dir(request, tiny_llama_dir, tiny_qwen3_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_qwen3_dir


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_match_hf_hidden_states_bit_exact(tiny_dir, dtype):
    model = _load(tiny_dir, dtype)
    n = model.config.num_hidden_layers
    ids = _batch(model.config.vocab_size)
    layer_ids = list(range(n))
    with torch.inference_mode():
        ref = model(input_ids=ids, output_hidden_states=True)
        with capture_layers(model, layer_ids) as cap:
            model.model(input_ids=ids)
    assert len(ref.hidden_states) == n + 1
    stacked = cap.stacked()
    assert stacked.shape == (2, 11, n, model.config.hidden_size) and stacked.dtype == dtype
    for pos, i in enumerate(layer_ids[:-1]):
        assert torch.equal(stacked[:, :, pos], ref.hidden_states[dspark_to_hf_hidden_index(i)]), f"layer {i}"
    # transformers 5.x: hidden_states[N] is the POST-norm state, not the raw last layer output.
    last = stacked[:, :, -1]
    assert not torch.equal(last, ref.hidden_states[n])
    with torch.inference_mode():
        assert torch.equal(model.model.norm(last), ref.hidden_states[n])
        # final post-norm state == hidden_states[-1] == what the LM head consumes
        assert torch.equal(cap.final, ref.hidden_states[-1])
        assert torch.equal(model.lm_head(cap.final), ref.logits)


def test_layer_order_follows_layer_ids(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    ids = _batch(model.config.vocab_size)
    with torch.inference_mode(), capture_layers(model, [3, 0, 2], capture_final=False) as cap:
        ref = model(input_ids=ids, output_hidden_states=True)
    assert cap.final is None
    assert torch.equal(cap.stacked()[:, :, 1], ref.hidden_states[1])  # id 0
    assert torch.equal(cap.stacked()[:, :, 2], ref.hidden_states[3])  # id 2


def test_incremental_forward_with_kv_cache(tiny_qwen3_dir):
    """Each cached decoding step captures only its new positions, equal to a full forward's."""
    model = _load(tiny_qwen3_dir)
    ids = _batch(model.config.vocab_size, b=1, s=9)
    with torch.inference_mode(), capture_layers(model, [0, 2, 3]) as cap:
        model.model(input_ids=ids)
        full, full_final = cap.stacked().clone(), cap.final.clone()  # [1, 9, 3, H]
        out = model.model(input_ids=ids[:, :6], use_cache=True)
        assert cap.stacked().shape[1] == 6
        cache = out.past_key_values
        for t in range(6, 9):
            out = model.model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step = cap.stacked()  # [1, 1, 3, H]
            assert step.shape == (1, 1, 3, model.config.hidden_size)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cap.final[:, 0], full_final[:, t], rtol=1e-5, atol=1e-5)


def test_hooks_removed_on_exit_and_on_error(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    parts = find_decoder_parts(model)
    with pytest.raises(RuntimeError, match="boom"), capture_layers(model, [0, 1]):
        assert len(parts.layers[0]._forward_hooks) == 1
        raise RuntimeError("boom")
    assert all(len(layer._forward_hooks) == 0 for layer in parts.layers)
    assert len(parts.norm._forward_hooks) == 0


def test_stacked_before_forward_is_an_error(tiny_llama_dir):
    with (
        capture_layers(_load(tiny_llama_dir), [1]) as cap,
        pytest.raises(RuntimeError, match=r"layer ids \[1\]"),
    ):
        cap.stacked()


def test_invalid_layer_ids(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    with (
        pytest.raises(LayerIdError, match=r"\[4\] out of range.*num_hidden_layers=4"),
        capture_layers(model, [0, 4]),
    ):
        pass
    with pytest.raises(LayerIdError, match="duplicates"), capture_layers(model, [1, 1]):
        pass


def test_unsupported_architecture_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedArchitectureError, match=r"Sequential.*model\.model\.layers"):
        find_decoder_parts(model)


def test_accepts_bare_base_model(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    assert find_decoder_parts(model.model).layers is model.model.layers
