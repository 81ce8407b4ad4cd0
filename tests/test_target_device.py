"""One device/dtype rule for every path that runs the target (dump backends, generate, evaluate),
and the constructor contract the two dump backends share."""

from __future__ import annotations

import inspect

import pytest
import torch

from dspark_offline.config import TargetConfig
from dspark_offline.entry import describe_user_error
from dspark_offline.target import loader
from dspark_offline.target.backend import TargetBackendClass
from dspark_offline.target.device import (
    TargetDeviceError,
    resolve_device,
    resolve_dtype,
    resolve_vllm_device,
)
from dspark_offline.target.hf_backend import HFTarget
from dspark_offline.target.vllm_backend import VLLMTarget


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_cpu_float32_without_cuda(no_cuda):
    dev = resolve_device("auto")
    assert dev == torch.device("cpu") and resolve_dtype("auto", dev) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", dev) == torch.float16


def test_cuda_without_cuda_is_an_error_not_a_fallback(no_cuda):
    with pytest.raises(TargetDeviceError, match=r"device='cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")


def test_evaluate_and_generate_loader_refuses_cuda_without_cuda(no_cuda, monkeypatch, tiny_llama_dir):
    """The loader of evaluate and generate resolves the device before loading anything, and the
    error is a one-line user error (exit 2), as in dump."""
    monkeypatch.setattr(loader, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(TargetDeviceError, match="CUDA is not available") as e:
        loader.load_target(TargetConfig(path=str(tiny_llama_dir), device="cuda"))
    assert describe_user_error(e.value).startswith("TargetDeviceError: target device='cuda'")


def test_bad_dtype_names_the_field():
    with pytest.raises(TargetDeviceError, match=r"train\.dtype='half': expected one of auto, float32"):
        resolve_dtype("half", torch.device("cpu"), field="train.dtype")


def test_vllm_device_is_the_builds():
    assert resolve_vllm_device("auto", "cpu") == torch.device("cpu")
    assert resolve_vllm_device("cuda:0", "cuda") == torch.device("cuda:0")
    with pytest.raises(TargetDeviceError, match="installed vLLM runs on 'cpu'"):
        resolve_vllm_device("cuda", "cpu")
    with pytest.raises(TargetDeviceError, match="CUDA_VISIBLE_DEVICES"):
        resolve_vllm_device("cuda:1", "cuda")


@pytest.mark.parametrize("backend", [HFTarget, VLLMTarget], ids=["hf", "vllm"])
def test_backends_share_the_constructor_contract(backend):
    """Every parameter of `TargetBackendClass.__call__`, same name, order, kind and default; a
    backend's extras come after them and have defaults (dump passes only the shared ones)."""
    shared = list(inspect.signature(TargetBackendClass.__call__).parameters.values())[1:]  # without self
    params = list(inspect.signature(backend.__init__).parameters.values())[1:]
    assert [(p.name, p.kind, p.default) for p in params[: len(shared)]] == [
        (p.name, p.kind, p.default) for p in shared
    ]
    assert all(p.default is not inspect.Parameter.empty for p in params[len(shared) :])
