"""vLLM backend: its pure helpers on CPU; the engine itself only where vLLM and CUDA exist."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from dspark_offline.target.capture import capture_layers
from dspark_offline.target.vllm_backend import load_head_tensors, plan_aux_ids, rms_norm

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_module_import_does_not_import_vllm():
    assert HAS_VLLM or "vllm" not in sys.modules


def test_plan_aux_ids():
    # dspark id i -> aux id i+1; aux id N (raw last layer) is appended for final_hidden
    assert plan_aux_ids([1, 9, 17, 25], 30) == ([2, 10, 18, 26, 30], [0, 1, 2, 3], 4)
    # the last layer already requested: not duplicated
    assert plan_aux_ids([0, 3], 4) == ([1, 4], [0, 1], 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_head_tensors_from_safetensors_match_the_model(arch, tiny_llama_dir, tiny_qwen3_dir):
    path = tiny_llama_dir if arch == "llama" else tiny_qwen3_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    heads = load_head_tensors(path, bool(model.config.tie_word_embeddings))
    assert torch.equal(heads["embed_tokens"], model.model.embed_tokens.weight)
    assert torch.equal(heads["lm_head"], model.lm_head.weight)
    assert torch.equal(heads["final_norm"], model.model.norm.weight)
    assert heads["lm_head"].data_ptr() != heads["embed_tokens"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_target_norm(tiny_qwen3_dir, dtype):
    """final_hidden of the vLLM backend = our RMSNorm of the raw last layer == HF's norm, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=dtype).eval()
    ids = torch.randint(20, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), capture_layers(model, [3]) as cap:
        model.model(input_ids=ids)
        ours = rms_norm(cap.stacked()[:, :, 0], model.model.norm.weight, model.config.rms_norm_eps)
    assert ours.dtype == dtype
    assert torch.equal(ours, cap.final)


def test_missing_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_head_tensors(tmp_path, True)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_backend_says_how_to_install(tiny_llama_dir):
    from dspark_offline.target.vllm_backend import VLLMTarget

    with pytest.raises(ImportError, match=r"dspark-offline\[vllm\]"):
        VLLMTarget(tiny_llama_dir, layer_ids=[1])


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and CUDA")
def test_vllm_matches_hf_backend(tiny_llama_dir):
    from dspark_offline.target.hf_backend import HFTarget
    from dspark_offline.target.vllm_backend import VLLMTarget

    ids = torch.tensor([[1, 57, 300, 12, 9], [1, 44, 71, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    v = VLLMTarget(tiny_llama_dir, layer_ids=[0, 2], top_k=8, dtype="float32",
                   engine_kwargs={"gpu_memory_utilization": 0.3, "enforce_eager": True})
    h = HFTarget(tiny_llama_dir, layer_ids=[0, 2], top_k=8, dtype="float32", device="cuda")
    try:
        out_v, out_h = v.forward(ids, mask), h.forward(ids, mask)
    finally:
        v.close()
    valid = mask.bool()
    torch.testing.assert_close(out_v.hidden[valid], out_h.hidden[valid], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out_v.topk_probs[valid], out_h.topk_probs[valid], rtol=1e-3, atol=1e-4)
