"""HFTarget on tiny random Llama (tied head) and Qwen3 (untied head) targets, fp32 and bf16.

References are independent code paths on the same weights: HF's own ``*ForCausalLM`` forward
with ``output_hidden_states=True`` for the states, and a full fp64 softmax over HF's own logits
for the top-k. Layer states and the final hidden must match bit for bit (same dtype, same batch).
"""

from __future__ import annotations

import pytest
import torch

from dspark_offline.target.backend import TargetBackend, TargetOutput
from dspark_offline.target.hf_backend import HFTarget
from dspark_offline.target.layers import LayerIdError, dspark_to_hf_hidden_index

K = 16

INFO_KEYS = {
    "name", "path", "weights_hash", "architecture", "model_type", "num_hidden_layers", "hidden_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
    "rope_theta", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "dtype",
    "mask_token_id", "tokenizer_size", "special_tokens", "tokenizer_hash", "chat_template_hash",
}  # fmt: skip


@pytest.fixture(params=["llama", "qwen3"])
def tiny_dir(request, tiny_llama_dir, tiny_qwen3_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_qwen3_dir


def _samples(tokenizer) -> list[torch.Tensor]:
    """Three rendered chats of different lengths (real template, real tokenizer)."""
    texts = ["Hi!", "What is the capital of France? Answer in one word.", "Count: one two three four"]
    out = []
    for text in texts:
        chat = [{"role": "user", "content": text}, {"role": "assistant", "content": "Sure."}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        out.append(torch.tensor(ids, dtype=torch.int64))
    return out


def _right_pad(samples: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(x) for x in samples)
    ids = torch.full((len(samples), s), pad_id, dtype=torch.int64)  # [B, S]
    mask = torch.zeros(len(samples), s, dtype=torch.int64)
    for b, x in enumerate(samples):
        ids[b, : len(x)], mask[b, : len(x)] = x, 1
    return ids, mask


def assert_topk_matches(ids, probs, ref_logits, rtol, atol):
    """Sorted probs equal the reference top-k, and each returned id carries its reference prob."""
    full = torch.softmax(ref_logits.double(), dim=-1)  # [..., V]
    ref_top = full.topk(ids.shape[-1], dim=-1).values.float()
    torch.testing.assert_close(probs, ref_top, rtol=rtol, atol=atol)
    torch.testing.assert_close(full.gather(-1, ids).float(), probs, rtol=rtol, atol=atol)
    assert (probs[..., :-1] >= probs[..., 1:]).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_matches_hf(tiny_dir, dtype):
    layer_ids = [0, 1, 2, 3]
    target = HFTarget(tiny_dir, layer_ids=layer_ids, top_k=K, dtype=dtype, device="cpu")
    ids, mask = _right_pad(_samples(target.tokenizer), target.tokenizer.pad_token_id)
    out = target.forward(ids, mask)
    assert isinstance(out, TargetOutput)
    B, S, H, n = *ids.shape, 64, 4
    assert out.hidden.shape == (B, S, len(layer_ids), H) and out.hidden.dtype == getattr(torch, dtype)
    assert out.final_hidden.shape == (B, S, H) and out.final_hidden.dtype == getattr(torch, dtype)
    assert out.topk_ids.shape == out.topk_probs.shape == (B, S, K)
    assert out.topk_ids.dtype == torch.int64 and out.topk_probs.dtype == torch.float32
    assert out.hidden.device.type == "cpu"

    with torch.inference_mode():
        ref = target.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for pos, i in enumerate(layer_ids[:-1]):
            assert torch.equal(out.hidden[:, :, pos], ref.hidden_states[dspark_to_hf_hidden_index(i)]), i
        # id N-1 is the raw last layer; HF's hidden_states[N] is its post-norm version (5.x)
        assert torch.equal(target.model.model.norm(out.hidden[:, :, n - 1]), ref.hidden_states[n])
    assert torch.equal(out.final_hidden, ref.hidden_states[-1])

    valid = mask.bool()
    # fp32: exact up to fp32 rounding; bf16: HF's logits are bf16-rounded, ours fp32 (finer)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == "float32" else {"rtol": 3e-2, "atol": 1e-6}
    assert_topk_matches(out.topk_ids[valid], out.topk_probs[valid], ref.logits[valid], **tol)
    assert (out.topk_probs[~valid] == 0).all() and (out.topk_ids[~valid] == 0).all()


def test_padded_batch_equals_single_samples(tiny_dir):
    """Right padding changes nothing but float rounding: the padded keys are masked out.

    Tolerance: matmuls over a different number of rows may round differently, so values agree
    to ~1e-5 (fp32), not bit for bit; top-k ids agree exactly.
    """
    target = HFTarget(tiny_dir, layer_ids=[1, 3], top_k=K, device="cpu")
    samples = _samples(target.tokenizer)
    batch = target.forward(*_right_pad(samples, target.tokenizer.pad_token_id))
    for b, x in enumerate(samples):
        single = target.forward(x[None], torch.ones(1, len(x), dtype=torch.int64))
        s = len(x)
        torch.testing.assert_close(batch.hidden[b, :s], single.hidden[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.final_hidden[b, :s], single.final_hidden[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.topk_probs[b, :s], single.topk_probs[0], rtol=1e-4, atol=1e-7)
        assert torch.equal(batch.topk_ids[b, :s], single.topk_ids[0])


def test_store_final_hidden_false(tiny_llama_dir):
    target = HFTarget(tiny_llama_dir, layer_ids=[2], top_k=4, store_final_hidden=False, device="cpu")
    out = target.forward(torch.tensor([[5, 6, 7]]), torch.ones(1, 3))
    assert out.final_hidden is None and out.hidden.shape == (1, 3, 1, 64)
    assert isinstance(target, TargetBackend)  # every member dump uses is there


def test_info_and_head_weights(tiny_llama_dir, tiny_qwen3_dir):
    llama = HFTarget(tiny_llama_dir, layer_ids=[1, 2], top_k=K, device="cpu")
    info = llama.info
    assert set(info) == INFO_KEYS
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert (info["num_hidden_layers"], info["hidden_size"], info["head_dim"]) == (4, 64, 16)
    assert (info["num_attention_heads"], info["num_key_value_heads"]) == (4, 2)
    assert info["vocab_size"] == info["tokenizer_size"] == len(llama.tokenizer)
    assert info["dtype"] == "float32" and info["tie_word_embeddings"] is True
    assert info["mask_token_id"] is None  # SmolLM2's tokenizer has no mask token
    assert info["special_tokens"]["<|im_end|>"] == 2 and info["special_tokens"]["<|endoftext|>"] == 0
    assert isinstance(info["rope_theta"], float) and len(info["weights_hash"]) == 16
    heads = llama.head_weights()
    assert heads["embed_tokens"].shape == heads["lm_head"].shape == (info["vocab_size"], 64)
    assert heads["final_norm"].shape == (64,)
    # tied: equal values, but an independent copy (the store writes both)
    assert torch.equal(heads["embed_tokens"], heads["lm_head"])
    assert heads["embed_tokens"].data_ptr() != heads["lm_head"].data_ptr()

    qwen = HFTarget(tiny_qwen3_dir, layer_ids=[1, 2], top_k=K, dtype="bfloat16", device="cpu")
    assert qwen.info["tie_word_embeddings"] is False and qwen.info["dtype"] == "bfloat16"
    assert qwen.info["weights_hash"] != info["weights_hash"]
    assert qwen.info["tokenizer_hash"] == info["tokenizer_hash"]  # same tokenizer
    w = qwen.head_weights()
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert not torch.equal(w["embed_tokens"], w["lm_head"])
    assert torch.equal(w["lm_head"], qwen.model.lm_head.weight)


def test_invalid_inputs_are_clear_errors(tiny_llama_dir):
    """Layer ids and top_k are checked where they are used (`dump` checks both against the target's
    config before loading it): by the layer hooks and the top-k at the first forward."""
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3)
    with pytest.raises(LayerIdError, match=r"\[7\] out of range.*num_hidden_layers=4"):
        HFTarget(tiny_llama_dir, layer_ids=[1, 7], device="cpu").forward(ids, mask)
    with pytest.raises(LayerIdError, match="empty"):
        HFTarget(tiny_llama_dir, layer_ids=[], device="cpu").forward(ids, mask)
    with pytest.raises(ValueError, match=r"top_k=0"):
        HFTarget(tiny_llama_dir, layer_ids=[1], top_k=0, device="cpu").forward(ids, mask)
    with pytest.raises(ValueError, match=r"dtype='half'"):
        HFTarget(tiny_llama_dir, layer_ids=[1], dtype="half", device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFTarget(tiny_llama_dir / "nope", layer_ids=[1], device="cpu")
    target = HFTarget(tiny_llama_dir, layer_ids=[1], top_k=4, device="cpu")
    with pytest.raises(ValueError, match=r"rows \[0\] are not right-padded"):
        target.forward(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match=r"must both be \[B, S\]"):
        target.forward(torch.tensor([5, 6]), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="int64"):
        target.forward(torch.tensor([[5.0, 6.0]]), torch.tensor([[1, 1]]))


def test_embedded_smollm2(embedded_target_dir):
    """The real target once (~7 s): default layer ids, bit-exact states, top-k vs HF logits."""
    from dspark_offline.target.layers import default_layer_ids

    layer_ids = default_layer_ids(30, 5)
    target = HFTarget("embedded:smollm2", layer_ids=layer_ids, top_k=64, device="cpu")
    assert target.path == embedded_target_dir
    assert target.info["hidden_size"] == 576 and target.info["vocab_size"] == 49152
    ids, mask = _right_pad(_samples(target.tokenizer)[:2], target.tokenizer.pad_token_id)
    out = target.forward(ids, mask)
    with torch.inference_mode():
        ref = target.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for pos, i in enumerate(layer_ids):
        assert torch.equal(out.hidden[:, :, pos], ref.hidden_states[dspark_to_hf_hidden_index(i)]), i
    assert torch.equal(out.final_hidden, ref.hidden_states[-1])
    valid = mask.bool()
    assert_topk_matches(out.topk_ids[valid], out.topk_probs[valid], ref.logits[valid], rtol=1e-4, atol=1e-7)
    # real weights: after the user turn, "<|im_start|>" is followed by "ass|istant"
    last_im_start = (ids[0] == 1).nonzero()[-1, 0]
    assert target.tokenizer.decode([int(out.topk_ids[0, last_im_start, 0])]) == "ass"
    assert out.topk_probs[0, last_im_start, 0] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_is_bf16_and_matches_hf(tiny_qwen3_dir):
    """Same code on CUDA: dtype auto -> bfloat16, outputs on CPU, states bit-exact vs HF there."""
    target = HFTarget(tiny_qwen3_dir, layer_ids=[0, 2], top_k=K, device="auto")
    assert target.device.type == "cuda" and target.dtype == torch.bfloat16
    ids, mask = _right_pad(_samples(target.tokenizer), target.tokenizer.pad_token_id)
    out = target.forward(ids, mask)
    assert out.hidden.device.type == "cpu" and out.hidden.dtype == torch.bfloat16
    assert out.hidden.is_pinned() and out.topk_probs.is_pinned()  # copied on the side stream (host_copy.py)
    with torch.inference_mode():
        ref = target.model(input_ids=ids.cuda(), attention_mask=mask.cuda(), output_hidden_states=True)
    for pos, i in enumerate([0, 2]):
        assert torch.equal(out.hidden[:, :, pos], ref.hidden_states[i + 1].cpu()), i
    assert torch.equal(out.final_hidden, ref.hidden_states[-1].cpu())
    valid = mask.bool()
    assert_topk_matches(
        out.topk_ids[valid], out.topk_probs[valid], ref.logits.cpu()[valid], rtol=3e-2, atol=1e-6
    )
