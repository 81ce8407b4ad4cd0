"""What a stage-1 target backend is: the contract `dump` relies on, and what every backend shares.

Two backends implement it: ``hf_backend.HFTarget`` (Hugging Face transformers, CPU or CUDA) and
``vllm_backend.VLLMTarget`` (vLLM, optional extra). `dump` picks one by ``dump.backend``, builds it
through the shared constructor (`TargetBackendClass`), and from then on uses only the members of
`TargetBackend`. Backend-independent pieces live here too: the output type, the right-padding check
and the manifest's target description.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from dspark_offline.target.fingerprint import tokenizer_hashes, weights_hash


@dataclass
class TargetOutput:
    """Features of one right-padded batch, all on CPU. Padded positions of the top-k are 0."""

    hidden: torch.Tensor  # [B, S, L, H] compute dtype, layer order = layer_ids
    final_hidden: torch.Tensor | None  # [B, S, H] compute dtype, after the final norm
    topk_ids: torch.Tensor  # [B, S, K] int64, distribution of token t+1 given <= t
    topk_probs: torch.Tensor  # [B, S, K] float32, sorted descending


@runtime_checkable
class TargetBackend(Protocol):
    """A target as a stage-1 feature source (what `dump` uses after construction)."""

    path: Path  # the local model directory (the embedded target already converted)
    device: torch.device  # where the target computes
    dtype: torch.dtype  # its compute dtype
    layer_ids: list[int]  # "dspark" ids captured, in the order of TargetOutput.hidden's L axis
    top_k: int
    tokenizer: Any

    @property
    def info(self) -> dict:
        """Manifest ``target`` fields + tokenizer hashes (`target_info`)."""
        ...

    @property
    def backend_info(self) -> dict:
        """Manifest ``backend``: ``{"name", "device", "versions"}``."""
        ...

    def head_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies in the compute dtype: ``embed_tokens [V, H]``, ``lm_head [V, H]`` (a copy even
        when tied), ``final_norm [H]``."""
        ...

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TargetOutput:
        """One right-padded batch ``[B, S]`` -> its features (`TargetOutput`)."""
        ...

    def close(self) -> None:
        """Release the backend (engine processes, temporary files). `dump` calls it in ``finally``."""
        ...


class TargetBackendClass(Protocol):
    """The constructor both backends share (a backend may add keyword-only extras with defaults,
    as vLLM's ``engine_kwargs``).

    Args:
        model_dir: HF model directory, or ``embedded:smollm2`` (converted once, cached).
        layer_ids: "dspark" ids to capture, already resolved and checked against the target's depth
            (``layers.resolve_layer_ids``; `dump` does it from the target's config before loading).
        top_k: entries of the next-token distribution to keep, ``1 <= top_k <= vocab_size``
            (`dump` checks it against the config; ``topk.topk_from_final`` refuses it otherwise).
        store_final_hidden: return ``final_hidden`` (it is computed either way for the top-k).
        dtype: ``target.dtype`` ('auto' | 'float32' | 'bfloat16' | 'float16'), resolved by `device.py`.
        device: ``target.device`` ('auto' | 'cpu' | 'cuda' | 'cuda:N'), resolved by `device.py`.
        cache_dir: conversion cache of the embedded target.
    """

    def __call__(
        self,
        model_dir: str | Path,
        layer_ids: list[int],
        top_k: int = 64,
        store_final_hidden: bool = True,
        dtype: str = "auto",
        device: str = "auto",
        cache_dir: str | None = None,
    ) -> TargetBackend: ...


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def target_info(path: Path, config, tokenizer, dtype: torch.dtype, vocab_size: int) -> dict:
    """The ``target.info`` dict (manifest ``target`` fields + tokenizer hashes), backend-independent."""
    heads = config.num_attention_heads
    tok_hash, template_hash = tokenizer_hashes(tokenizer)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    special.update(tokenizer.get_added_vocab())
    return {
        "name": path.name,
        "path": str(path),
        "weights_hash": weights_hash(path),
        # saved HF configs name their class; a bare config (LlamaConfig) implies LlamaForCausalLM
        "architecture": (
            config.architectures or [type(config).__name__.removesuffix("Config") + "ForCausalLM"]
        )[0],
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": float(getattr(config, "rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(config),
        "vocab_size": vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": str(dtype).removeprefix("torch."),
        "mask_token_id": tokenizer.mask_token_id,
        "tokenizer_size": len(tokenizer),
        "special_tokens": dict(sorted(special.items(), key=lambda kv: kv[1])),
        "tokenizer_hash": tok_hash,
        "chat_template_hash": template_hash,
    }


def check_right_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)} "
            "must both be [B, S]"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 (got {input_ids.dtype})")
    mask = attention_mask.bool()
    # Right padding: once a row hits 0 it stays 0. Left padding would shift RoPE positions.
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        rows = torch.nonzero((mask[:, 1:] & ~mask[:, :-1]).any(dim=1)).flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are not right-padded (a 1 follows a 0)")
    if not mask[:, 0].all():
        rows = torch.nonzero(~mask[:, 0]).flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are empty (mask[:, 0] == 0)")
