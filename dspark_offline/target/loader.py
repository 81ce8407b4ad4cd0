"""The one Hugging Face target loader: dump's `HFTarget`, generate's HF engine and evaluate all load
the target here, with the device and dtype resolved by `device.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_offline.config import TargetConfig
from dspark_offline.linalg import use_vocab_head
from dspark_offline.target.attention import ATTENTION
from dspark_offline.target.device import resolve_device, resolve_dtype
from dspark_offline.target.embedded import resolve_target_path


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, object]:
    """``(*ForCausalLM in eval mode, frozen, on device; tokenizer)`` from a local directory."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION)
    model.to(device).eval().requires_grad_(False)
    use_vocab_head(model)  # same logits, faster on CPU for the few-row forwards of decoding
    return model, tokenizer


@dataclass
class LoadedTarget:
    """A target loaded for decoding (evaluate, generate)."""

    model: nn.Module  # *ForCausalLM, eval mode
    tokenizer: object
    path: Path
    stop_ids: frozenset[int]  # generation stops after any of these


def stop_token_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config (may be a list), else the tokenizer's EOS."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])


def load_target(cfg: TargetConfig) -> LoadedTarget:
    """Load the target named by ``params.target`` (embedded GGUF converted once) for decoding."""
    path = resolve_target_path(cfg.path, cfg.cache_dir)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(path, resolve_dtype(cfg.dtype, device), device)
    return LoadedTarget(model, tokenizer, Path(path), stop_token_ids(model, tokenizer))
