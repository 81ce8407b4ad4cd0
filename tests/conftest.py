"""Shared fixtures: tiny random targets that use the real SmolLM2 tokenizer (and chat template).

The tokenizer comes from the embedded GGUF (converted once into the user cache), so tests need
no network. Models are random and tiny (hidden 64, 4 layers) so every test runs in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def embedded_target_dir() -> Path:
    """The converted SmolLM2-135M-Instruct HF directory (real weights, 30 layers)."""
    from dspark_offline.target.embedded import resolve_target_path

    return resolve_target_path("embedded:smollm2")


def _make_tiny(out: Path, tokenizer_dir: Path, arch: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=False))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_target_dir) -> Path:
    """Tiny random Llama (4 layers, H=64, tied head) with the SmolLM2 tokenizer."""
    return _make_tiny(tmp_path_factory.mktemp("tiny_llama"), embedded_target_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, embedded_target_dir) -> Path:
    """Tiny random Qwen3 (4 layers, H=64, untied head) with the SmolLM2 tokenizer."""
    return _make_tiny(tmp_path_factory.mktemp("tiny_qwen3"), embedded_target_dir, "qwen3")
