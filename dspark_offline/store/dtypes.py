"""Logical dtypes of stored arrays, and bfloat16 as uint16 bit patterns.

zarr 3.1 has no bfloat16 data type. Casting bf16 to float16 would silently lose range (bf16
has float32's exponent) and casting to float32 doubles the bytes, so a bf16 array is stored as
its raw 16-bit patterns (``uint16``) with the array attribute ``logical_dtype = "bfloat16"``;
the reader reinterprets the bits, which is exact by construction. float8 e4m3 hidden states are
stored the same way (``uint8`` bit patterns, ``logical_dtype = "float8_e4m3"``), but never cast
to directly: they need their scales (store/fp8.py), so `to_storage` refuses them.
"""

from __future__ import annotations

import numpy as np
import torch

LOGICAL_DTYPE_ATTR = "logical_dtype"

# logical name -> (torch dtype, numpy dtype the bits are stored as)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "bfloat16": (torch.bfloat16, np.dtype("uint16")),
    "float8_e4m3": (torch.float8_e4m3fn, np.dtype("uint8")),
    "float16": (torch.float16, np.dtype("float16")),
    "float32": (torch.float32, np.dtype("float32")),
    "int32": (torch.int32, np.dtype("int32")),
    "int64": (torch.int64, np.dtype("int64")),
    "uint8": (torch.uint8, np.dtype("uint8")),
}


class DtypeError(ValueError):
    """A dtype name or tensor dtype the store does not support."""


def _entry(logical: str) -> tuple[torch.dtype, np.dtype]:
    try:
        return _DTYPES[logical]
    except KeyError:
        raise DtypeError(f"unsupported logical dtype {logical!r}; supported: {sorted(_DTYPES)}") from None


def logical_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    for name, (t, _) in _DTYPES.items():
        if t == dtype:
            return name
    raise DtypeError(f"unsupported tensor dtype {dtype}; supported: {sorted(_DTYPES)}")


def torch_dtype(logical: str) -> torch.dtype:
    return _entry(logical)[0]


def storage_dtype(logical: str) -> np.dtype:
    """The numpy dtype a logical dtype is stored as in Zarr (bfloat16 -> uint16)."""
    return _entry(logical)[1]


def to_storage(t: torch.Tensor, logical: str) -> np.ndarray:
    """Tensor -> numpy array in the storage dtype of `logical` (cast first if needed).

    bf16 goes through ``int16`` because numpy has no bf16; the bits are copied unchanged.
    """
    tdtype, ndtype = _entry(logical)
    if tdtype == torch.float8_e4m3fn:
        raise DtypeError("float8_e4m3 arrays are written with their scales (store.fp8.encode), never cast to")
    t = t.detach().to("cpu", tdtype).contiguous()
    if tdtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ndtype)
    return t.numpy()


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Numpy array read from Zarr -> tensor of the logical dtype (bit-exact for bf16; float8_e4m3:
    the raw codes, which `store.fp8.decode` scales)."""
    tdtype, ndtype = _entry(logical)
    if a.dtype != ndtype:
        raise DtypeError(f"array stored as {a.dtype} but logical dtype {logical!r} needs {ndtype}")
    a = np.ascontiguousarray(a)
    if tdtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if tdtype == torch.float8_e4m3fn:
        return torch.from_numpy(a).view(torch.float8_e4m3fn)
    return torch.from_numpy(a)
