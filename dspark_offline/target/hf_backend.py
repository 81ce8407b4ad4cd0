"""Hugging Face transformers target backend: one forward -> layer states, final hidden, top-k.

The forward runs the bare transformer (``model.model``), never the ``*ForCausalLM`` head: layer
states and the final post-norm state come from forward hooks (``capture.py``), and the top-k of
the next-token distribution is computed from the final state in token chunks (``topk.py``), only
on real (unpadded) tokens. That skips the ``[B, S, V]`` logits tensor a plain ``model(...)``
call materialises, which is what keeps the dump close to the cost of a bare target forward.

The same code runs on CPU and CUDA; attention is SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_offline.config import TargetConfig
from dspark_offline.linalg import use_vocab_head
from dspark_offline.target.attention import ATTENTION
from dspark_offline.target.capture import UnsupportedArchitectureError, capture_layers, find_decoder_parts
from dspark_offline.target.fingerprint import tokenizer_hashes, weights_hash
from dspark_offline.target.layers import validate_layer_ids
from dspark_offline.target.topk import topk_from_final

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' = CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"target device={device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"target dtype={dtype!r}: expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, object]:
    """The one place a target is loaded: ``(*ForCausalLM in eval mode, frozen, on device; tokenizer)``."""
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
    from dspark_offline.target.embedded import resolve_target_path

    path = resolve_target_path(cfg.path, cfg.cache_dir)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(path, resolve_dtype(cfg.dtype, device), device)
    return LoadedTarget(model, tokenizer, Path(path), stop_token_ids(model, tokenizer))


@dataclass
class TargetOutput:
    """Features of one right-padded batch, all on CPU. Padded positions of the top-k are 0."""

    hidden: torch.Tensor  # [B, S, L, H] compute dtype, layer order = layer_ids
    final_hidden: torch.Tensor | None  # [B, S, H] compute dtype, after the final norm
    topk_ids: torch.Tensor  # [B, S, K] int64, distribution of token t+1 given <= t
    topk_probs: torch.Tensor  # [B, S, K] float32, sorted descending


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
        "architecture": (config.architectures or [type(config).__name__.removesuffix("Config") + "ForCausalLM"])[0],
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


class HFTarget:
    """A Hugging Face causal LM as a stage-1 feature source (see module docstring).

    Args:
        model_dir: HF model directory, or ``embedded:smollm2`` (converted once, cached).
        layer_ids: "dspark" layer ids to capture, validated against the model depth.
        top_k: entries of the next-token distribution to keep.
        store_final_hidden: return ``final_hidden`` (it is computed either way for the top-k).
        dtype: 'auto' | 'float32' | 'bfloat16' | 'float16'.
        device: 'auto' | 'cpu' | 'cuda' | 'cuda:N'.
        cache_dir: conversion cache of the embedded target.
    """

    def __init__(
        self,
        model_dir: str | Path,
        layer_ids: list[int],
        top_k: int = 64,
        store_final_hidden: bool = True,
        dtype: str = "auto",
        device: str = "auto",
        cache_dir: str | None = None,
    ) -> None:
        from dspark_offline.target.embedded import resolve_target_path

        self.path = resolve_target_path(str(model_dir), cache_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model(self.path, self.dtype, self.device)
        self.config = self.model.config
        self._parts = find_decoder_parts(self.model)
        self._check_plain_head()
        self.layer_ids = validate_layer_ids(list(layer_ids), len(self._parts.layers))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k={top_k} must be in [1, vocab_size={vocab}]")
        self.top_k = top_k
        self.store_final_hidden = store_final_hidden
        # The head in fp32 once (no copy when the model is already fp32), reused by every batch.
        self._head_fp32 = self.model.get_output_embeddings().weight.detach().to(torch.float32)  # [V, H]
        self._info: dict | None = None

    def _check_plain_head(self) -> None:
        """Refuse heads whose logits are not ``W h`` (bias, scaling, soft-capping): top-k would be wrong."""
        head = self.model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise UnsupportedArchitectureError(f"{self.path}: model has no output embedding (lm_head)")
        odd = {
            name: getattr(self.config, name, None)
            for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
            if getattr(self.config, name, None) not in (None, 1, 1.0)
        }
        if getattr(head, "bias", None) is not None:
            odd["lm_head.bias"] = "present"
        if odd:
            raise UnsupportedArchitectureError(
                f"{self.path}: logits are not lm_head(final_norm(h)) ({odd}); unsupported target"
            )

    @property
    def info(self) -> dict:
        """Target description for the store manifest (computed once; hashing reads the files)."""
        if self._info is None:
            self._info = target_info(self.path, self.config, self.tokenizer, self.dtype, self._head_fp32.shape[0])
        return self._info

    @property
    def backend_info(self) -> dict:
        """Manifest ``backend``: name, device type, library versions."""
        import transformers

        return {
            "name": "hf",
            "device": self.device.type,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }

    def close(self) -> None:
        """Nothing to release beyond the model (kept for the backends' common API)."""

    def head_weights(self) -> dict[str, torch.Tensor]:
        """Frozen weights the drafter needs, as CPU copies in the compute dtype (lm_head even if tied)."""

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True).contiguous()

        return {
            "embed_tokens": copy(self.model.get_input_embeddings().weight),  # [V, H]
            "lm_head": copy(self.model.get_output_embeddings().weight),  # [V, H]
            "final_norm": copy(self._parts.norm.weight),  # [H]
        }

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TargetOutput:
        """Run one right-padded batch ``[B, S]``; see ``TargetOutput``."""
        check_right_padded(input_ids, attention_mask)
        ids = input_ids.to(self.device, torch.int64)  # [B, S]
        mask = attention_mask.to(self.device)  # [B, S]
        with capture_layers(self.model, self.layer_ids, capture_final=True) as cap:
            self._parts.base(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = cap.stacked()  # [B, S, L, H]
        final = cap.final  # [B, S, H]
        valid = mask.bool()  # [B, S]
        B, S = ids.shape
        topk_ids = torch.zeros(B, S, self.top_k, dtype=torch.int64, device=self.device)  # [B, S, K]
        topk_probs = torch.zeros(B, S, self.top_k, dtype=torch.float32, device=self.device)
        t_ids, t_probs = topk_from_final(final[valid], self._head_fp32, self.top_k)  # [T, K] each
        topk_ids[valid], topk_probs[valid] = t_ids, t_probs
        return TargetOutput(
            hidden=hidden.cpu(),
            final_hidden=final.cpu() if self.store_final_hidden else None,
            topk_ids=topk_ids.cpu(),
            topk_probs=topk_probs.cpu(),
        )

    __call__ = forward
