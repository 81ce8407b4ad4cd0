"""Weights / tokenizer / chat-template fingerprints: stable, and sensitive to real changes."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_offline.target.fingerprint import tokenizer_hashes, weights_hash


def test_weights_hash_stable_and_detects_finetune(tiny_llama_dir, tmp_path):
    h = weights_hash(tiny_llama_dir)
    assert h == weights_hash(tiny_llama_dir) and len(h) == 16
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert weights_hash(copy) == h  # content hash, not path hash
    # a "fine-tune": same names, shapes, dtypes and sizes, every weight slightly changed
    model = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    assert (tuned / "model.safetensors").stat().st_size == (copy / "model.safetensors").stat().st_size
    assert weights_hash(tuned) != h


def test_weights_hash_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_hash(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        weights_hash(tmp_path)


def test_tokenizer_hashes(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok_hash, tmpl_hash = tokenizer_hashes(tok)
    assert (tok_hash, tmpl_hash) == tokenizer_hashes(AutoTokenizer.from_pretrained(tiny_llama_dir))
    tok.chat_template = tok.chat_template + "{# changed #}"
    assert (
        tokenizer_hashes(tok) == (tok_hash, tokenizer_hashes(tok)[1])
        and tokenizer_hashes(tok)[1] != tmpl_hash
    )
    tok.add_tokens(["<|brand_new|>"], special_tokens=True)
    assert tokenizer_hashes(tok)[0] != tok_hash


def test_named_chat_templates_are_hashed(tiny_qwen3_dir):
    """prepare (meta.json) and dump (target.info) both hash with `tokenizer_hashes`; a dict of
    named templates is hashed whole, so adding one changes the template hash only."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    tok_hash, template_hash = tokenizer_hashes(tok)
    tok.chat_template = {"default": tok.chat_template, "tool_use": "{{ messages }}"}
    assert tokenizer_hashes(tok)[0] == tok_hash and tokenizer_hashes(tok)[1] != template_hash
