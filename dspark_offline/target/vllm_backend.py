"""vLLM target backend: same API as ``HFTarget``, layer states from vLLM's hidden-state extraction.

UNTESTED AGAINST A REAL vLLM: this project's CI and development machines have no GPU and no vLLM,
so this module has only been exercised through its pure helpers (head loading, RMSNorm, aux-id
planning; see tests/test_target_vllm_backend.py). It is written against the documented vLLM
feature "Hidden State Extraction" (docs.vllm.ai .../features/speculative_decoding/
extract_hidden_states, vLLM >= 0.33): an offline ``LLM`` built with
``speculative_config={"method": "extract_hidden_states", "draft_model_config": {"hf_config":
{"eagle_aux_hidden_state_layer_ids": [...]}}}`` and the ``ExampleHiddenStatesConnector`` KV
connector writes, per request, a safetensors file with ``hidden_states [S, n_aux, H]`` and
``token_ids [S]``; ``output.kv_transfer_params["hidden_states_path"]`` names it, and
``load_hidden_states`` reads it once the writer released its lock. vLLM is imported lazily
(optional extra ``dspark-offline[vllm]``).

Conventions (``layers.py``): vLLM aux id ``k`` = the state entering decoder layer ``k`` = output of
layer ``k-1`` = dspark id ``k-1``; aux id ``N`` = raw output of the last layer (not normalised).
We request every dspark id plus aux id ``N``, apply the target's final RMSNorm to the latter
(fp32, the HF formula) for ``final_hidden``, and compute the top-k from it with the frozen
``lm_head`` (``topk.py``), so vLLM never materialises logits for the prompt.

Differences from ``HFTarget`` to know about: ``final_hidden`` comes from our RMSNorm, not vLLM's
fused kernel (equal up to rounding); vLLM needs CUDA; prefix caching and chunked prefill are
disabled so every prompt token is computed in one prefill and captured.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from dspark_offline.target.hf_backend import TargetOutput, check_right_padded, resolve_dtype, target_info
from dspark_offline.target.layers import dspark_to_vllm_aux_id, validate_layer_ids
from dspark_offline.target.topk import topk_from_final

# Tensor names in Llama/Qwen/Mistral-style HF checkpoints.
EMBED_NAME, HEAD_NAME, NORM_NAME = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


def plan_aux_ids(layer_ids: list[int], num_hidden_layers: int) -> tuple[list[int], list[int], int]:
    """vLLM aux ids to request, where each dspark id lands in the capture, and where the last layer is.

    Returns ``(aux_ids, layer_pos, last_pos)``: ``capture[:, layer_pos]`` are ``layer_ids`` in
    order, ``capture[:, last_pos]`` is the raw last-layer output (for ``final_hidden``).
    """
    aux = [dspark_to_vllm_aux_id(i) for i in layer_ids]
    if num_hidden_layers not in aux:  # aux id N: raw output of layer N-1
        aux.append(num_hidden_layers)
    return aux, list(range(len(layer_ids))), aux.index(num_hidden_layers)


def load_head_tensors(model_dir: Path, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """embed_tokens, lm_head and final_norm straight from the safetensors files (no model load)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        single = model_dir / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json); the vLLM backend reads heads from safetensors")
        with safe_open(single, framework="pt") as f:
            where = {name: single.name for name in f.keys()}
    wanted = {"embed_tokens": EMBED_NAME, "final_norm": NORM_NAME}
    wanted["lm_head"] = EMBED_NAME if tie_word_embeddings or HEAD_NAME not in where else HEAD_NAME
    out = {}
    for key, name in wanted.items():
        if name not in where:
            raise KeyError(f"{model_dir}: tensor {name!r} not found; expected a Llama/Qwen-style checkpoint")
        with safe_open(model_dir / where[name], framework="pt") as f:
            out[key] = f.get_tensor(name).clone()  # clone: lm_head stays a copy even when tied
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama/Qwen RMSNorm: normalise in fp32, cast back, then scale. ``[..., H]`` -> ``[..., H]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class VLLMTarget:
    """``HFTarget``'s API over a vLLM engine (see module docstring; needs CUDA and vllm)."""

    def __init__(
        self,
        model_dir: str | Path,
        layer_ids: list[int],
        top_k: int = 64,
        store_final_hidden: bool = True,
        dtype: str = "auto",
        device: str = "auto",
        cache_dir: str | None = None,
        engine_kwargs: dict | None = None,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("dump.backend='vllm' needs vLLM: pip install 'dspark-offline[vllm]'") from e
        from transformers import AutoConfig, AutoTokenizer

        from dspark_offline.target.embedded import resolve_target_path

        if device not in ("auto", "cuda") and not device.startswith("cuda"):
            raise ValueError(f"target device={device!r}: the vLLM backend runs on CUDA only (use backend 'hf')")
        if not torch.cuda.is_available():
            raise RuntimeError("the vLLM backend needs a CUDA device; none is available (use backend 'hf')")
        self.path = resolve_target_path(str(model_dir), cache_dir)
        self.device = torch.device(device if device != "auto" else "cuda")
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = AutoConfig.from_pretrained(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        n = self.config.num_hidden_layers
        self.layer_ids = validate_layer_ids(list(layer_ids), n)
        self.top_k, self.store_final_hidden = top_k, store_final_hidden
        self._aux_ids, self._layer_pos, self._last_pos = plan_aux_ids(self.layer_ids, n)
        heads = load_head_tensors(self.path, bool(getattr(self.config, "tie_word_embeddings", False)))
        self._heads = {k: v.to(self.dtype) for k, v in heads.items()}  # CPU, compute dtype
        vocab = self._heads["lm_head"].shape[0]
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k={top_k} must be in [1, vocab_size={vocab}]")
        self._head_fp32 = self._heads["lm_head"].to(self.device, torch.float32)  # [V, H]
        self._norm = self._heads["final_norm"].to(self.device)  # [H]
        self._eps = float(getattr(self.config, "rms_norm_eps", 1e-6))
        self._spool = Path(tempfile.mkdtemp(prefix="dspark-vllm-hidden-"))
        self.llm = LLM(
            model=str(self.path),
            dtype=str(self.dtype).removeprefix("torch."),
            enable_chunked_prefill=False,  # required by the extraction: one prefill per prompt
            enable_prefix_caching=False,  # a cached prefix would not be recomputed, hence not captured
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self._aux_ids}},
            },
            kv_transfer_config={
                "kv_connector": "ExampleHiddenStatesConnector",
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": str(self._spool)},
            },
            **(engine_kwargs or {}),
        )
        self._info: dict | None = None

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = target_info(self.path, self.config, self.tokenizer, self.dtype, self._head_fp32.shape[0])
        return self._info

    def head_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._heads.items()}

    def _capture(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """One prefill per prompt; returns each prompt's capture ``[S, n_aux, H]``."""
        from vllm import SamplingParams
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states,
            load_hidden_states,
        )
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False
        )
        captures = []
        for prompt, out in zip(prompts, outputs):
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if path is None:
                raise RuntimeError(f"vLLM returned no hidden_states_path for request {out.request_id}")
            data = load_hidden_states(path)
            cleanup_hidden_states(path)
            hs = data["hidden_states"]  # [S, n_aux, H]
            expected = (len(prompt), len(self._aux_ids), self.config.hidden_size)
            if tuple(hs.shape) != expected or data["token_ids"].tolist() != prompt:
                raise RuntimeError(
                    f"{path}: captured hidden_states {list(hs.shape)} (expected {list(expected)}) or token_ids "
                    "differ from the prompt; this vLLM's hidden-state extraction format is not supported"
                )
            captures.append(hs)
        return captures

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TargetOutput:
        """Same contract as ``HFTarget.forward`` (right-padded ``[B, S]`` in, CPU tensors out)."""
        check_right_padded(input_ids, attention_mask)
        lengths = attention_mask.bool().sum(1).tolist()
        prompts = [input_ids[b, :n].tolist() for b, n in enumerate(lengths)]
        B, S = input_ids.shape
        L, H, K = len(self.layer_ids), self.config.hidden_size, self.top_k
        hidden = torch.zeros(B, S, L, H, dtype=self.dtype)  # [B, S, L, H]
        final = torch.zeros(B, S, H, dtype=self.dtype)  # [B, S, H]
        topk_ids = torch.zeros(B, S, K, dtype=torch.int64)  # [B, S, K]
        topk_probs = torch.zeros(B, S, K, dtype=torch.float32)
        for b, (n, cap) in enumerate(zip(lengths, self._capture(prompts))):
            cap = cap.to(self.device, self.dtype)  # [n, n_aux, H]
            f = rms_norm(cap[:, self._last_pos], self._norm, self._eps)  # [n, H]
            ids, probs = topk_from_final(f, self._head_fp32, K)  # [n, K]
            hidden[b, :n] = cap[:, self._layer_pos].cpu()
            final[b, :n], topk_ids[b, :n], topk_probs[b, :n] = f.cpu(), ids.cpu(), probs.cpu()
        return TargetOutput(
            hidden=hidden,
            final_hidden=final if self.store_final_hidden else None,
            topk_ids=topk_ids,
            topk_probs=topk_probs,
        )

    __call__ = forward

    def close(self) -> None:
        """Remove the spool directory the connector wrote into."""
        shutil.rmtree(self._spool, ignore_errors=True)
