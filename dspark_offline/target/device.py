"""The one place `target.device` and `target.dtype` (and `train.dtype`) become torch objects.

Every path that runs the target resolves them here: the dump backends (HF and vLLM), the generate
engines and evaluate. The rules: 'auto' device = CUDA when available, else CPU (for vLLM: the device
its installed build runs on); 'auto' dtype = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are
slow and lossy). Asking for CUDA where there is none is an error, never a silent fallback.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TargetDeviceError(ValueError):
    """`target.device` / `target.dtype` names a device or dtype this machine cannot give."""


def resolve_device(device: str) -> torch.device:
    """'auto' = CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TargetDeviceError(f"target device={device!r} requested but CUDA is not available")
    return dev


def resolve_vllm_device(device: str, vllm_device: str) -> torch.device:
    """The device of a vLLM engine: it must be the one the installed vLLM build runs on
    (``vllm_device``, 'cuda' or 'cpu'); 'auto' means exactly that."""
    if device == "auto":
        return torch.device(vllm_device)
    dev = torch.device(device)
    if dev.type != vllm_device:
        raise TargetDeviceError(
            f"target.device={device!r} but the installed vLLM runs on {vllm_device!r} "
            "(use target.device=auto, or the other vLLM build)"
        )
    if dev.index not in (None, 0):
        raise TargetDeviceError(
            f"target.device={device!r}: vLLM picks its GPUs from CUDA_VISIBLE_DEVICES; use target.device=cuda"
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device, field: str = "target dtype") -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 on CPU; else one of ``DTYPES``. ``field`` names the
    parameter in the error (``train.dtype`` resolves here too)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TargetDeviceError(f"{field}={dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
