"""Hugging Face transformers target backend: one forward -> layer states, final hidden, top-k.

The forward runs the bare transformer (``model.model``), never the ``*ForCausalLM`` head: layer
states and the final post-norm state come from forward hooks (``capture.py``), and the top-k of
the next-token distribution is computed from the final state in token chunks (``topk.py``), only
on real (unpadded) tokens. That skips the ``[B, S, V]`` logits tensor a plain ``model(...)``
call materialises, which is what keeps the dump close to the cost of a bare target forward.

The same code runs on CPU and CUDA; attention is SDPA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark_offline.target.backend import TargetOutput, check_right_padded, target_info
from dspark_offline.target.capture import UnsupportedArchitectureError, capture_layers, find_decoder_parts
from dspark_offline.target.device import resolve_device, resolve_dtype
from dspark_offline.target.embedded import resolve_target_path
from dspark_offline.target.host_copy import HostCopies
from dspark_offline.target.loader import load_model
from dspark_offline.target.topk import topk_from_final


class HFTarget:
    """A Hugging Face causal LM as a stage-1 feature source (see module docstring): a
    ``backend.TargetBackend``, built with the constructor every backend shares
    (``backend.TargetBackendClass``, which documents the arguments)."""

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
        self.path = resolve_target_path(str(model_dir), cache_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model(self.path, self.dtype, self.device)
        self.config = self.model.config
        self._parts = find_decoder_parts(self.model)
        self._check_plain_head()
        self.layer_ids = list(layer_ids)  # checked by `capture_layers` at every forward
        self.top_k = top_k  # checked by `topk_from_final`
        self.store_final_hidden = store_final_hidden
        # The head in fp32 once (no copy when the model is already fp32), reused by every batch.
        self._head_fp32 = self.model.get_output_embeddings().weight.detach().to(torch.float32)  # [V, H]
        self._copies = HostCopies(self.device)  # device -> host copies of the outputs (target/host_copy.py)
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
            self._info = target_info(
                self.path, self.config, self.tokenizer, self.dtype, self._head_fp32.shape[0]
            )
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
        # on CUDA the states go to pinned host memory on a side stream while the top-k is computed
        hidden_host = self._copies.start(hidden)
        final_host = self._copies.start(final) if self.store_final_hidden else None
        valid = mask.bool()  # [B, S]
        B, S = ids.shape
        topk_ids = torch.zeros(B, S, self.top_k, dtype=torch.int64, device=self.device)  # [B, S, K]
        topk_probs = torch.zeros(B, S, self.top_k, dtype=torch.float32, device=self.device)
        t_ids, t_probs = topk_from_final(final[valid], self._head_fp32, self.top_k)  # [T, K] each
        topk_ids[valid], topk_probs[valid] = t_ids, t_probs
        out = TargetOutput(
            hidden=hidden_host,
            final_hidden=final_host,
            topk_ids=self._copies.start(topk_ids),
            topk_probs=self._copies.start(topk_probs),
        )
        self._copies.wait()
        return out

    __call__ = forward
